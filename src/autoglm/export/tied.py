"""The tied embedding / LM head in a quantized export: one int8 table for both.

The fp32 export stores the tied table W (V, d) once: a Gather reads it and the LM head
reads `Transpose(W)` (ONNX Runtime folds that in memory). The quantizer needs the LM-head
weight as an initializer, so quantization folds it to W^T (d, V) -- and quantizing the
Gather too would store a second int8 copy of the table (plus its float original when the
LM head stays in float). Instead, before quantizing:

1. `gather_rows_from_transposed`: each Gather(W, ids) becomes Transpose(Gather(W^T, ids,
   axis=1)), so W^T is the only copy, and that Gather is kept out of quantization;

after quantizing:

2. `gather_quantized_rows`: when the LM head's W^T was quantized (symmetric int8 per
   output channel, i.e. one scale per vocabulary entry), the Gather reads the int8 W^T and
   dequantizes each gathered row with its own scale: Cast(Gather(W^T_q, ids, axis=1)) *
   Gather(scale, ids). The float W^T is dropped; the table is stored once, in int8, with a
   per-token scale (finer than the per-tensor scale ONNX Runtime gives a quantized Gather).
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from .storage import rename_inputs, transposed_initializer

__all__ = ["gather_rows_from_transposed", "gather_quantized_rows"]


def _rank(graph: onnx.GraphProto, name: str) -> int | None:
    for vi in list(graph.input) + list(graph.value_info):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def gather_rows_from_transposed(model: onnx.ModelProto) -> list[str]:
    """In place, on an fp32 graph: for a 2-D initializer W read by a Gather (axis 0) and by a
    Transpose (the tied LM head), fold the Transpose into W^T and let the Gather read W^T's
    columns. Returns the names of the rewritten Gather nodes (keep them out of quantization)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    transposes = {n.input[0]: n for n in g.node if n.op_type == "Transpose" and n.input[0] in inits
                  and len(inits[n.input[0]].dims) == 2
                  and list(next((helper.get_attribute_value(a) for a in n.attribute if a.name == "perm"), [1, 0]))
                  == [1, 0]}
    new_nodes, gathers, folded = [], [], set()
    for node in g.node:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        w = node.input[0] if node.op_type == "Gather" else None
        rank = _rank(g, node.input[1]) if w in transposes and axis == 0 else None
        if rank is None:
            new_nodes.append(node)
            continue
        wt = transposed_initializer(g, w)  # `<W>.T`: the LM head keeps a name float_nodes knows
        folded.add(w)
        cols = node.output[0] + "_columns"  # (d, *ids.shape)
        new_nodes.append(helper.make_node("Gather", [wt, node.input[1]], [cols], name=node.name, axis=1))
        new_nodes.append(helper.make_node("Transpose", [cols], [node.output[0]], name=node.name + "_rows",
                                          perm=list(range(1, rank + 1)) + [0]))
        gathers.append(node.name)
    renamed = {transposes[w].output[0]: f"{w}.T" for w in folded}
    new_nodes = [n for n in new_nodes if not (n.op_type == "Transpose" and n.output[0] in renamed)]
    del g.node[:]
    g.node.extend(new_nodes)
    rename_inputs(g, renamed)
    _drop_unused_initializers(g)
    return gathers


def _axis(node: onnx.NodeProto) -> int:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)


def gather_quantized_rows(model: onnx.ModelProto, gathers: list[str]) -> int:
    """In place, on a quantized graph: each Gather named in `gathers` reads a float W^T (dynamic
    mode) or DequantizeLinear of the whole W^T (static QDQ) that the quantizer also stored as
    `W^T_quantized` (int8, symmetric, one scale per column): gather the int8 columns instead,
    scaling each by its own scale, and drop the float copy. Returns the number of rewritten
    Gathers (0 when the LM head stayed in float)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    count, new_nodes = 0, []
    nodes = list(g.node)
    for i, node in enumerate(nodes):
        wt = node.input[0] if node.op_type == "Gather" and node.name in gathers else None
        dq = producers.get(wt) if wt else None
        if dq is not None and dq.op_type == "DequantizeLinear" and _axis(dq) == 1:
            # static (QDQ): the quantizer made every reader of W^T read DequantizeLinear(W^T_q)
            q, s, z = (list(dq.input) + [""])[:3]
        else:  # dynamic: the float W^T stays for the excluded Gather, W^T_q is the MatMul's
            q, s, z = (f"{wt}_quantized", f"{wt}_scale", f"{wt}_zero_point") if wt else (None, None, None)
        ok = (wt is not None and q in inits and s in inits and inits[q].data_type == onnx.TensorProto.INT8
              and len(inits[s].dims) == 1 and inits[s].dims[0] == inits[q].dims[1]
              and (z not in inits or not numpy_helper.to_array(inits[z]).any()))
        rows = next((n for n in nodes[i + 1:] if n.op_type == "Transpose" and n.input[0] == node.output[0]), None)
        if not ok or rows is None:
            new_nodes.append(node)
            continue
        ids, out = node.input[1], node.output[0]
        new_nodes += [
            helper.make_node("Gather", [q, ids], [out + "_int8"], name=node.name, axis=1),  # (d, *ids)
            helper.make_node("Cast", [out + "_int8"], [out + "_f"], name=node.name + "_cast",
                             to=onnx.TensorProto.FLOAT),
            helper.make_node("Gather", [s, ids], [out + "_scale"], name=node.name + "_scale", axis=0),  # (*ids)
            helper.make_node("Mul", [out + "_f", out + "_scale"], [out], name=node.name + "_dequant"),
        ]
        count += 1
    del g.node[:]
    g.node.extend(new_nodes)
    _drop_unused_initializers(g)
    return count
