"""Ops that have no microcontroller lowering, refused before any work with the op and layer.

TVM legalizes a few ops into calls of its runtime library (`T.call_packed("tvm.contrib.sort.*")`
for sort/argsort/topk) or into data-dependent shapes (nonzero, unique, masked_select); a
bare-metal C project has neither the runtime nor a heap, so these ops cannot run there.
Random ops have no reproducible reference. Every other ATen/qc op lowers to a PrimFunc that
TVM's `c` target prints as plain C.
"""

from __future__ import annotations

import torch

from qcompiler.errors import LoweringError
from qcompiler.ir import op_name

NO_MCU_LOWERING = {
    "aten.topk": "TVM lowers it to a call of its runtime sort library (tvm.contrib.sort)",
    "aten.sort": "TVM lowers it to a call of its runtime sort library (tvm.contrib.sort)",
    "aten.argsort": "TVM lowers it to a call of its runtime sort library (tvm.contrib.sort)",
    "aten.nonzero": "its output size depends on the data (the MCU plan needs static sizes)",
    "aten.unique": "its output size depends on the data (the MCU plan needs static sizes)",
    "aten._unique2": "its output size depends on the data (the MCU plan needs static sizes)",
    "aten.masked_select": "its output size depends on the data (the MCU plan needs static sizes)",
    "aten.multinomial": "random sampling has no reproducible reference",
    "aten.bernoulli": "random sampling has no reproducible reference",
    "aten.rand": "random sampling has no reproducible reference",
    "aten.randn": "random sampling has no reproducible reference",
}


def layer_of(node: torch.fx.Node) -> str:
    """The module path the node came from (its nn_module_stack), else the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, kind = list(stack.values())[-1]
        kind = getattr(kind, "__name__", str(kind)).rsplit(".", 1)[-1]
        return f"{path or '<model>'} ({kind})"
    return node.name


def check_ops(gm: torch.fx.GraphModule, target: str) -> None:
    """LoweringError naming the first op (and its layer and node) with no MCU lowering."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = op_name(node).split(".")
        base = ".".join(name[:2])
        if base in NO_MCU_LOWERING:
            raise LoweringError(
                f"{base} in layer {layer_of(node)} (node {node.name}) has no {target} lowering: "
                f"{NO_MCU_LOWERING[base]}. Compute it outside the model (on the host or in firmware code), "
                "or compile for target='host' or 'arm'")
