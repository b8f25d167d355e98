"""Saving several ONNX graphs that share one weights file, and graph clean-ups.

The prefill and decode graphs hold the same weights. Optimum writes them twice (or merges
the graphs under an `If` node); here every large initializer is written once into
`weights.bin` -- deduplicated by content hash -- and both `.onnx` files point into it with
ONNX external-data references (location / offset / length), so the directory is about
the size of one model.

`gemm_to_matmul` rewrites `Gemm(A, W, transB=1)` with a constant `W` (what
`torch.onnx.export` emits for `nn.Linear` on 2-D inputs) as `MatMul(A, W^T)`: ONNX
Runtime's dynamic quantization handles `MatMul` but not `Gemm`, so without it every MoE
expert and the LM head would stay in float.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["WEIGHTS_FILE", "save_graphs", "load_graph", "directory_size_mb", "size_report", "gemm_to_matmul",
           "fold_weight_transposes", "transposed_initializer", "rename_inputs", "strip_metadata"]

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.bin"
_INLINE_MAX_BYTES = 1024  # smaller tensors (shapes, scalars, scales) stay inside the graph
_ALIGN = 64


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """In place: Gemm(A, W, transB=1, alpha=beta=1[, C]) with initializer W -> MatMul(A, W^T) [+ C].

    Returns the number of rewritten nodes. A transposed copy is added per distinct W; W is
    dropped when nothing else uses it (a tied embedding keeps its Gather table).
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    transposed: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    for node in g.node:
        ok = (node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in inits
              and _attr(node, "transA", 0) == 0 and _attr(node, "transB", 0) == 1
              and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0)
        if not ok:
            new_nodes.append(node)
            continue
        w_name = node.input[1]
        if w_name not in transposed:
            w_t = np.ascontiguousarray(numpy_helper.to_array(inits[w_name]).T)  # (in, out)
            t_name = f"{w_name}.T"
            g.initializer.append(numpy_helper.from_array(w_t, t_name))
            transposed[w_name] = t_name
        has_bias = len(node.input) >= 3 and node.input[2]
        mm_out = node.output[0] + "_mm" if has_bias else node.output[0]
        new_nodes.append(onnx.helper.make_node("MatMul", [node.input[0], transposed[w_name]], [mm_out],
                                               name=node.name + "_matmul"))
        if has_bias:
            new_nodes.append(onnx.helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]],
                                                   name=node.name + "_bias"))
        count += 1
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return count


def fold_weight_transposes(model: onnx.ModelProto, keep_shared: bool = False) -> int:
    """In place: Transpose(perm=[1, 0]) of a 2-D initializer -> a transposed initializer.

    The exporter keeps `Transpose(W)` as a node when W is shared (the tied embedding /
    LM head: a Gather table and the LM-head MatMul weight); ONNX Runtime's quantizer only
    quantizes a MatMul whose weight is a constant initializer, so the quantizer's input is
    folded. `keep_shared=True` leaves the Transpose of a weight that other nodes also read:
    the fp32 export stores the tied table once (ONNX Runtime folds the Transpose in memory
    when it loads the graph). The folded weight is named `<W>.T`, so name-based choices
    (`quantize.float_nodes`: the LM head) still recognise it. Returns the number of folded nodes."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, int] = {}
    for node in g.node:
        for i in set(node.input):
            readers[i] = readers.get(i, 0) + 1
    keep, renamed = [], {}
    for node in g.node:
        perm = _attr(node, "perm", None)
        shared = keep_shared and readers.get(node.input[0], 0) > 1
        if (node.op_type == "Transpose" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2
                and list(perm or [1, 0]) == [1, 0] and not shared):
            renamed[node.output[0]] = transposed_initializer(g, node.input[0])
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    rename_inputs(g, renamed)
    return len(renamed)


def transposed_initializer(graph: onnx.GraphProto, name: str) -> str:
    """Add `<name>.T`, the transpose of the 2-D initializer `name`, unless it exists; returns its name."""
    t_name = f"{name}.T"
    if not any(t.name == t_name for t in graph.initializer):
        w = next(t for t in graph.initializer if t.name == name)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T), t_name))
    return t_name


def rename_inputs(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    """In place: every node input named a key of `renamed` reads the value instead."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]


def strip_metadata(model: onnx.ModelProto) -> None:
    """In place: drop per-node metadata (the exporter's stack traces) and doc strings."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def save_graphs(models: dict[str, onnx.ModelProto], directory: str | Path) -> dict[str, Path]:
    """Write each model as `directory/<name>.onnx`, their large initializers once into
    `directory/weights.bin` (identical tensors stored once). Returns name -> path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    offsets: dict[str, tuple[int, int]] = {}  # content hash -> (offset, length)
    paths: dict[str, Path] = {}
    with open(directory / WEIGHTS_FILE, "wb") as fw:
        for name, model in models.items():
            model = onnx.ModelProto.FromString(model.SerializeToString())  # never mutate the caller's proto
            for t in _all_initializers(model.graph):
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    raise ValueError(f"initializer {t.name} still refers to external data; load the model "
                                     f"with load_external_data=True before saving")
                raw = numpy_helper.to_array(t).tobytes() if not t.HasField("raw_data") else t.raw_data
                if len(raw) <= _INLINE_MAX_BYTES:
                    continue
                key = hashlib.sha256(raw + str(t.data_type).encode() + str(list(t.dims)).encode()).hexdigest()
                if key not in offsets:
                    pad = (-fw.tell()) % _ALIGN
                    fw.write(b"\0" * pad)
                    offsets[key] = (fw.tell(), len(raw))
                    fw.write(raw)
                off, length = offsets[key]
                for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                              "string_data"):
                    t.ClearField(field)
                t.ClearField("raw_data")
                del t.external_data[:]
                t.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(off)), ("length", str(length))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
            path = directory / f"{name}.onnx"
            path.write_bytes(model.SerializeToString())
            paths[name] = path
    log.info("wrote %s (%d shared tensors)", ", ".join(p.name for p in paths.values()), len(offsets))
    return paths


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:  # subgraphs (If / Loop bodies)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(a.g)


def load_graph(path: str | Path) -> onnx.ModelProto:
    """Load a graph written by `save_graphs` with its weights inlined (for quantization)."""
    return onnx.load(str(path), load_external_data=True)


def directory_size_mb(directory: str | Path, suffixes: tuple[str, ...] = (".onnx", ".bin")) -> float:
    """Size on disk of the model files in `directory` (graphs + shared weights), in MB (1e6 bytes)."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.suffix in suffixes) / 1e6


def size_report(directory: str | Path, safetensors_mb: float | None, fp32_onnx_mb: float | None = None) -> dict:
    """An export's size (graphs + weights.bin, MB) and how many times smaller it is than the
    FP32 safetensors checkpoint it came from and, for a quantized export, than the FP32
    ONNX directory (`*_over_onnx`: that size / this one)."""
    mb = directory_size_mb(directory)
    out = {"onnx_mb": mb, "safetensors_mb": safetensors_mb,
           "safetensors_over_onnx": safetensors_mb / mb if safetensors_mb else None}
    if fp32_onnx_mb is not None:
        out.update(fp32_onnx_mb=fp32_onnx_mb, fp32_onnx_over_onnx=fp32_onnx_mb / mb)
    return out
