"""Export a saved model to ONNX: a prefill graph and a decode graph with the KV cache.

Layout of an export directory (Optimum's "with past" layout, weights stored once):

    out/
      prefill.onnx   input_ids (B, T), attention_mask (B, T)
                     -> logits (B, T, V), present.{i}.key/value (B, Hkv, T, D)
      decode.onnx    input_ids (B, T), attention_mask (B, P + T), past_key_values.{i}.key/value (B, Hkv, P, D)
                     -> logits (B, T, V), present.{i}.key/value (B, Hkv, P + T, D)
      weights.bin    the initializers of both graphs, each stored once
      config.json    the model config; tokenizer.json / tokenizer_config.json when the model had them
      export.json    opset, precision, axes, and the measured parity against eager PyTorch

Batch, sequence and past axes are dynamic (the dummy input uses sizes 2 / 3 / 5 so no
size is specialised, and the parity check runs other sizes). Positions come from the
attention mask; the prefill graph of a sparse model runs windowed attention (chunks of
queries against their window + global keys, `export.attention`), the decode graph the
dense masked kernel; the MoE runs its static dense dispatch (see `wrapper`).

The export is written into a temporary directory next to `out` and moved into place
only after the ONNX Runtime logits matched eager PyTorch (`parity_ok`: max |difference|
<= atol + rtol * max |logit|, per graph): a failed or drifting export leaves nothing
behind. The tolerance grows with the logits' scale because float32 reordering (ONNX
Runtime's fused kernels sum in another order than PyTorch's) errs relative to the values
summed: a correct export of a `small` model trained 10 steps once differed by 1.26e-4 on
prefill, logits of a few units. Observed float32 noise is 1e-6 to 3e-5 of max |logit|; the
default rtol 1e-4 leaves room for other machines' kernels, and a real divergence (a wrong
mask, position or expert) is orders of magnitude larger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch

from ..atomic import atomic_dir
from ..modules.moe import moe_dispatch
from ..rundir import RunDir
from .attention import DEFAULT_EXPORT_CHUNK
from .storage import fold_weight_transposes, gemm_to_matmul, save_graphs, size_report, strip_metadata
from .wrapper import PREFILL_ATTENTION, ExportDecoder, past_names, present_names

__all__ = [
    "SUPPORTED_OPSETS", "DEFAULT_OPSET", "DEFAULT_ATOL", "DEFAULT_RTOL", "ExportError", "load_model_dir",
    "export_onnx", "check_parity", "parity_ok", "copy_side_files", "safetensors_mb", "check_out_dir",
]

log = logging.getLogger(__name__)

SUPPORTED_OPSETS = tuple(range(18, 24))  # torch.onnx's exporter emits >= 18; onnxruntime 1.31 runs <= 23
DEFAULT_OPSET = 18
DEFAULT_ATOL = 1e-4  # absolute floor of the parity tolerance (logits near zero)
DEFAULT_RTOL = 1e-4  # times max |logit|: float32 reordering error grows with the values summed
_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class ExportError(RuntimeError):
    """The exported graph is wrong (e.g. its logits drift from eager PyTorch past the tolerance)."""


def load_model_dir(model_dir: str | Path):
    """Load an `OpenAutoGLMForCausalLM` from a saved directory, in eval mode, fp32."""
    return RunDir.open(model_dir).load_model(dtype=torch.float32)


def check_out_dir(out_dir: str | Path, src: str | Path, what: str = "model directory") -> None:
    """Refuse an output directory that is `src` or holds it: the export replaces OUT as a whole,
    so with --overwrite it would delete its own input (the model it was made from)."""
    out, full = Path(out_dir).resolve(), Path(src).resolve()
    if out == full or out in full.parents:
        beside = Path(src).parent / f"{full.name}-onnx"
        raise ValueError(f"--out {out_dir} is the {what} {src} or a folder holding it; the export replaces OUT "
                         f"as a whole, so write it elsewhere, e.g. --out {beside}")


def copy_side_files(src: str | Path, dst: str | Path) -> None:
    """Copy config and tokenizer files (those that exist) from src to dst."""
    for name in _SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters with requires_grad off for the duration (restored afterwards): a frozen MoE
    layer may cache its derived expert weights (`MoEFeedForward._cache_usable`)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """Silence what torch.onnx says on every export that is about nothing in this model: one
    warning per torchvision op when torchvision is absent, and a FutureWarning from inside
    torch's pytree. Anything else the exporter logs still shows."""
    import warnings

    reg = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = reg.level
    reg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        reg.setLevel(level)


def _export_graph(wrapper: ExportDecoder, with_past: bool, opset: int) -> onnx.ModelProto:
    from torch.export import Dim

    cfg = wrapper.model.config
    L, Hkv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    B, T, P = 2, 3, 5  # distinct sizes >= 2: nothing gets specialised to 0/1 or tied to another axis
    ids = torch.randint(2, cfg.vocab_size, (B, T))
    total = P + T if with_past else T
    mask = torch.ones(B, total, dtype=torch.long)
    past = tuple(torch.randn(B, Hkv, P, D) * 0.1 for _ in range(2 * L)) if with_past else ()
    dyn = Dim.DYNAMIC
    shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn})
    if with_past:
        shapes += (tuple({0: dyn, 2: dyn} for _ in past),)
    names_in = ["input_ids", "attention_mask"] + (past_names(L) if with_past else [])
    names_out = ["logits"] + present_names(L)
    try:
        # frozen + no_grad first: the MoE layers prebuild their wide expert weights once, and the
        # exported graph reads them as initializers (which INT8 quantizes) instead of a Concat
        with _frozen(wrapper.model), torch.no_grad(), moe_dispatch(wrapper.model, "dense"), _exporter_quiet():
            prog = torch.onnx.export(wrapper, (ids, mask, *past), input_names=names_in, output_names=names_out,
                                     dynamic_shapes=shapes, dynamo=True, opset_version=opset, verbose=False)
    except Exception as e:  # the exporter raises many types; report them as one
        raise ExportError(f"torch.onnx.export failed for the {'decode' if with_past else 'prefill'} graph: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; nothing was written") from e
    model = prog.model_proto
    _name_axes(model, L)
    # keep_shared: the tied embedding / LM-head table is stored once (Gather reads it, the LM
    # head reads Transpose(it)); quantization folds that Transpose later (see quantize)
    n = gemm_to_matmul(model) + fold_weight_transposes(model, keep_shared=True)
    strip_metadata(model)
    log.debug("rewrote %d Gemm/Transpose nodes so every weight is a constant MatMul input", n)
    onnx.checker.check_model(model, full_check=False)
    return model


def _name_axes(model: onnx.ModelProto, num_layers: int) -> None:
    """Give the dynamic axes readable names (batch, sequence, past_sequence, total_sequence)."""
    names = {"input_ids": ("batch", "sequence"), "attention_mask": ("batch", "total_sequence"),
             "logits": ("batch", "sequence", None)}
    for n in past_names(num_layers):
        names[n] = ("batch", None, "past_sequence", None)
    for n in present_names(num_layers):
        names[n] = ("batch", None, "total_sequence", None)
    for vi in list(model.graph.input) + list(model.graph.output):
        for dim, label in zip(vi.type.tensor_type.shape.dim, names.get(vi.name, ())):
            if label is not None and not dim.HasField("dim_value"):
                dim.dim_param = label


def safetensors_mb(model_dir: str | Path) -> float | None:
    """Size of `model_dir/model.safetensors` in MB (1e6 bytes), None when there is none."""
    f = Path(model_dir) / "model.safetensors"
    return f.stat().st_size / 1e6 if f.is_file() else None


def check_parity(model, onnx_dir: str | Path, batch: int = 3, prompt_len: int = 11, decode_steps: int = 4,
                 seed: int = 0) -> dict[str, float]:
    """Max |logits_ORT - logits_eager| for a random prompt batch (prefill) and `decode_steps`
    single-token decode steps fed back through the KV cache, with each graph's logit scale
    (max |eager logit|) and next-token (argmax) agreement. The eager reference is the model's
    own HF forward (its default kernels and MoE dispatch, `DynamicCache`); each side decodes
    from its own cache, so an INT8 export's error accumulates as it would in generation."""
    from .runtime import OrtCausalLM

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (batch, prompt_len), generator=g)
    ort_model = OrtCausalLM(onnx_dir)
    mask = np.ones((batch, prompt_len), dtype=np.int64)
    logits, past = ort_model.forward(ids.numpy(), mask)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        ref = out.logits.float().numpy()
        prefill, prefill_scale = float(np.abs(logits - ref).max()), float(np.abs(ref).max())
        prefill_agree = float((logits.argmax(-1) == ref.argmax(-1)).mean())
        decode = decode_scale = 0.0
        agree = []
        cache = out.cache
        for _ in range(decode_steps):
            nxt = torch.randint(2, model.config.vocab_size, (batch, 1), generator=g)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            logits, past = ort_model.forward(nxt.numpy(), mask, past)
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache = out.cache
            ref = out.logits.float().numpy()
            decode = max(decode, float(np.abs(logits - ref).max()))
            decode_scale = max(decode_scale, float(np.abs(ref).max()))
            agree.append(float((logits.argmax(-1) == ref.argmax(-1)).mean()))
    return {"prefill_max_abs_diff": prefill, "decode_max_abs_diff": decode,
            "prefill_logit_scale": prefill_scale, "decode_logit_scale": decode_scale,
            "prefill_argmax_agreement": prefill_agree,
            "decode_argmax_agreement": float(np.mean(agree)) if agree else 1.0}


def parity_ok(parity: dict[str, float], atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> dict[str, float]:
    """Each graph's tolerance, atol + rtol * its logit scale, checked against its max |difference|.

    Returns {"prefill": tolerance, "decode": tolerance}; raises ExportError naming the graph,
    the difference and the tolerance when a difference is past it (or NaN)."""
    tol = {}
    for graph in ("prefill", "decode"):
        diff, scale = parity[f"{graph}_max_abs_diff"], parity[f"{graph}_logit_scale"]
        tol[graph] = atol + rtol * scale
        if not diff <= tol[graph]:  # also catches NaN
            raise ExportError(
                f"ONNX Runtime logits differ from eager PyTorch by {diff:.3g} on the {graph} graph (tolerance "
                f"{tol[graph]:.3g} = atol {atol:g} + rtol {rtol:g} x max |logit| {scale:.3g}); nothing was "
                f"written. Look for an unsupported op or a kernel that changes the maths; raise --atol / --rtol "
                f"only if the difference is expected")
    return tol


def export_onnx(model_dir: str | Path, out_dir: str | Path, opset: int = DEFAULT_OPSET, atol: float = DEFAULT_ATOL,
                overwrite: bool = False, model=None, prefill_attention: str = "windowed",
                chunk: int = DEFAULT_EXPORT_CHUNK, rtol: float = DEFAULT_RTOL) -> dict:
    """Export the model saved in `model_dir` to `out_dir` (layout in the module docstring).

    model: an already loaded model to export instead of loading `model_dir` (its config
    and tokenizer files are still copied from `model_dir` when present).
    prefill_attention: "windowed" (sparse models: O(T * (W + chunk + G)) attention in the
    prefill graph) or "dense" (an explicit (T, T) mask, the reference); chunk: queries per
    chunk of the windowed kernel.
    atol, rtol: the parity check passes when each graph's max |logit difference| against
    eager PyTorch is <= atol + rtol * max |eager logit| (see `parity_ok`).
    Raises FileNotFoundError (no model), ValueError (unsupported opset), FileExistsError
    (`out_dir` not empty and not `overwrite`), ExportError (ORT logits drift past the tolerance).
    Returns the export info written to export.json.
    """
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset {opset} is not supported; use one of {SUPPORTED_OPSETS[0]}..{SUPPORTED_OPSETS[-1]} "
                         f"(torch.onnx emits opset >= 18 and onnxruntime runs up to 23); default {DEFAULT_OPSET}")
    if prefill_attention not in PREFILL_ATTENTION:
        raise ValueError(f"prefill_attention must be one of {PREFILL_ATTENTION}, got {prefill_attention!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if not (atol >= 0 and rtol >= 0):
        raise ValueError(f"atol and rtol must be >= 0, got {atol} and {rtol}")
    check_out_dir(out_dir, model_dir)
    model = model if model is not None else load_model_dir(model_dir)
    model = model.float().eval()
    cfg = model.config
    wrapper = ExportDecoder(model, prefill_attention, chunk).eval()
    windowed = prefill_attention == "windowed" and cfg.attention == "sparse"
    with atomic_dir(out_dir, overwrite) as tmp:
        log.info("exporting prefill and decode graphs (opset %d)", opset)
        graphs = {"prefill": _export_graph(wrapper, False, opset), "decode": _export_graph(wrapper, True, opset)}
        save_graphs(graphs, tmp)
        copy_side_files(model_dir, tmp)
        if not (tmp / "config.json").is_file():
            cfg.to_json_file(tmp / "config.json")
        info = {"format": "autoglm-onnx", "precision": "fp32", "opset": opset,
                "graphs": {"prefill": "prefill.onnx", "decode": "decode.onnx"},
                "num_layers": cfg.num_hidden_layers, "num_key_value_heads": cfg.num_key_value_heads,
                "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
                "max_position_embeddings": cfg.max_position_embeddings,
                "prefill_attention": {"kind": "windowed", "chunk": chunk} if windowed else {"kind": "dense"},
                "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
                "sizes": size_report(tmp, safetensors_mb(model_dir))}
        (tmp / "export.json").write_text(json.dumps(info, indent=2))
        # a prompt longer than window + chunk, so that the windowed prefill's chunk layout is exercised
        prompt_len = min(cfg.window_size + 2 * chunk + 5, cfg.max_position_embeddings - 8) if windowed else 11
        parity = check_parity(model, tmp, prompt_len=prompt_len)
        tol = parity_ok(parity, atol, rtol)
        info["parity_vs_eager"] = {**parity, "atol": atol, "rtol": rtol, "prefill_tolerance": tol["prefill"],
                                   "decode_tolerance": tol["decode"]}
        (tmp / "export.json").write_text(json.dumps(info, indent=2))
        log.info("exported to %s (%.1f MB); parity vs eager: %s", out_dir, info["sizes"]["onnx_mb"], parity)
    return info

