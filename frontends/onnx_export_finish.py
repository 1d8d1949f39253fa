"""Finish an exported QDQ model with onnx_ir: INT4 weight storage and tidy Q/DQ nodes.

torch has no int4 tensors, so the exporter writes every stored weight as INT8. Here:

    DQ(W_int8 [, 0])  ->  DQ(W_int4)      for weights recorded as at most 4 bits (opset >= 21);
                                          INT4 packs two values a byte (onnx_ir packs ml_dtypes.int4)
    DQ(W, s, 0)       ->  DQ(W, s)        an all-zero zero point of a constant is DQ's default
    Q/DQ attributes equal to the schema default, and `axis` of per-tensor nodes, are dropped
    constants folded by the exporter (val_12) are named after the tensor they quantize
    the exporter's notes on nodes and values (FX node text, module paths) are cleared: they
    describe the lowered graph, not the user's model
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import onnx
import onnx_ir

from qcompiler.errors import LoweringError

INT4_OPSET = 21
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def finish(model: onnx_ir.Model, weight_bits: dict[str, int], opset: int) -> None:
    """Rewrite `model` in place (see the module docstring)."""
    _store_weights(model, weight_bits, opset)
    _tidy_attributes(model, opset)
    _name_constants(model)
    onnx_ir.passes.common.RemoveUnusedNodesPass()(model)
    _clear_metadata(model)


def _store_weights(model: onnx_ir.Model, weight_bits: dict[str, int], opset: int) -> None:
    packed = set()
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or not _is_constant(node.inputs[0]):
            continue
        w = node.inputs[0]
        if len(node.inputs) > 2 and _is_constant(node.inputs[2]) and not np.any(node.inputs[2].const_value.numpy()):
            node.resize_inputs(2)
        if weight_bits.get(w.name, 8) <= 4 and opset >= INT4_OPSET and w.name not in packed:
            w.const_value = onnx_ir.Tensor(w.const_value.numpy().astype(ml_dtypes.int4), name=w.name)
            w.dtype = onnx_ir.DataType.INT4
            packed.add(w.name)
    missing = sorted(name for name, bits in weight_bits.items() if bits <= 4 and name not in packed)
    if missing and opset >= INT4_OPSET:  # never claim 4-bit storage and write INT8 silently
        raise LoweringError(f"export_onnx: 4-bit weights {missing} are not read by a DequantizeLinear "
                            "in the exported model (a qcompiler bug)")


def _tidy_attributes(model: onnx_ir.Model, opset: int) -> None:
    for node in model.graph:
        if node.op_type not in _QDQ:
            continue
        schema = onnx.defs.get_schema(node.op_type, opset)
        for name in list(node.attributes):
            default = schema.attributes[name].default_value if name in schema.attributes else None
            value = node.attributes[name].value
            is_default = default is not None and default.name and onnx.helper.get_attribute_value(default) == value
            per_tensor = name == "axis" and node.inputs[1].shape is not None and len(node.inputs[1].shape) == 0
            if is_default or per_tensor:
                del node.attributes[name]


def _name_constants(model: onnx_ir.Model) -> None:
    """x -> QuantizeLinear gives x_q, x_scale, x_zero_point; DQ(W) gives W_scale."""
    taken = {v.name for v in model.graph.initializers.values()} | {v.name for v in model.graph.inputs}
    taken |= {v.name for n in model.graph for v in n.outputs}

    def rename(v: onnx_ir.Value, new: str) -> None:
        if v is None or not re.fullmatch(r"val_\d+", v.name or "") or new in taken:
            return
        is_initializer = v.name in model.graph.initializers
        if is_initializer:
            del model.graph.initializers[v.name]
        v.name = new
        if is_initializer:
            model.graph.initializers[new] = v
        taken.add(new)

    for node in model.graph:
        if node.op_type not in _QDQ:
            continue
        base = node.inputs[0].name
        if node.op_type == "QuantizeLinear":
            rename(node.outputs[0], f"{base}_q")
        elif base.endswith("_q"):
            base = base[:-2]
        for v, role in zip(node.inputs[1:], ("scale", "zero_point")):
            rename(v, f"{base}_{role}")


def _clear_metadata(model: onnx_ir.Model) -> None:
    graph = model.graph
    values = [*graph.inputs, *graph.outputs, *graph.initializers.values()] + [v for n in graph for v in n.outputs]
    for item in [*graph, *values]:
        item.metadata_props.clear()


def _is_constant(v) -> bool:
    return v is not None and v.const_value is not None
