"""ONNX export (prefill + decode graphs with the KV cache), INT8 quantization through
ONNX Runtime's tools, and an ONNX Runtime generation loop."""

from .onnx_export import DEFAULT_OPSET, SUPPORTED_OPSETS, ExportError, check_parity, export_onnx, load_model_dir
from .quantize import QUANT_MODES, quantize_export
from .runtime import OrtCausalLM, read_export_info

__all__ = [
    "DEFAULT_OPSET", "SUPPORTED_OPSETS", "ExportError", "check_parity", "export_onnx", "load_model_dir",
    "OrtCausalLM", "read_export_info", "QUANT_MODES", "quantize_export"
]
