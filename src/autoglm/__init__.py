"""Open-AutoGLM: a sparse-attention Mixture-of-Experts causal language model.

Importing the package registers `OpenAutoGLMConfig` / `OpenAutoGLMForCausalLM` with
transformers' `AutoConfig` / `AutoModelForCausalLM`.
"""

from .adapters import SequenceClassificationAdapter, adapter_type
from .config import PRESETS, OpenAutoGLMConfig, preset_names
from .hf import AutoGLMCausalLMOutput, OpenAutoGLMForCausalLM

__version__ = "0.1.0"

__all__ = ["OpenAutoGLMConfig", "OpenAutoGLMForCausalLM", "AutoGLMCausalLMOutput", "PRESETS", "preset_names",
           "SequenceClassificationAdapter", "adapter_type", "__version__"]
