"""Per-layer weight widths, carried from the IR into the Relax converters.

`convert` states each integer layer's widths in `node.meta["qc"]` (`w_bits`, `a_bits`,
`group_size`, `source` = the layer). torch.export keeps no node.meta, so `collect` reads them
from the IR before export, keyed by the weight constant's attribute name, and checks them
(`packing.check_layer`: supported width and group size, values inside the declared width);
`bind` renames the keys to the placeholders of the exported program through its graph
signature (a lifted constant's `spec.target` is its attribute name, `spec.arg.name` the
placeholder the converters see). A converter then asks `WeightTable.get(node.args[i])` for
the layer's width and the constant's value, and stores the value packed (`packed`).
`serialized_bytes` measures what a built executable stores (program and constants).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx
import tvm

from qcompiler.ir import get_attr_tensor, op_name

from . import packing

# integer op -> position of its weight operand
WEIGHT_ARG = {"qc.linear_int": 2, "qc.linear_int_grouped": 3, "qc.conv2d_int": 2, "qc.linear_weight_only": 1}
_GROUP_ARG = {"qc.linear_int_grouped": 5, "qc.linear_weight_only": 3}


@dataclass(frozen=True)
class LayerWeight:
    layer: str
    bits: int
    values: np.ndarray  # the int8 weight as the IR holds it

    def packed(self, pad_to: int = 0) -> np.ndarray:
        """The weight as stored: rows along the reduction axis, packed for 2 and 4 bits."""
        rows = self.values.reshape(self.values.shape[0], -1)
        return packing.pack(rows, self.bits, pad_to)


class WeightTable:
    def __init__(self, by_attr: dict[str, LayerWeight]):
        self.by_attr = by_attr
        self.by_placeholder: dict[str, LayerWeight] = {}

    def bind(self, ep: torch.export.ExportedProgram) -> "WeightTable":
        """Key the layers by the exported program's placeholder names."""
        for spec in ep.graph_signature.input_specs:
            if spec.target in self.by_attr:
                self.by_placeholder[spec.arg.name] = self.by_attr[spec.target]
        return self

    def get(self, arg) -> LayerWeight | None:
        """The layer reading weight operand `arg` (an exported placeholder node), if known."""
        return self.by_placeholder.get(getattr(arg, "name", None))


def collect(gm: torch.fx.GraphModule) -> WeightTable:
    """Read and check the width of every integer layer's weight constant in the IR."""
    table = {}
    for n in gm.graph.nodes:
        name = op_name(n) if n.op == "call_function" else ""
        if name not in WEIGHT_ARG:
            continue
        meta = n.meta.get("qc", {})
        layer = meta.get("source", n.name)
        packing.check_act_bits(layer, meta.get("a_bits"))
        group = n.args[_GROUP_ARG[name]] if name in _GROUP_ARG else 0
        w_node = n.args[WEIGHT_ARG[name]]
        if not (isinstance(w_node, torch.fx.Node) and w_node.op == "get_attr"):
            packing.check_layer(layer, 8, group)  # computed weights are read as int8
            continue
        values = get_attr_tensor(gm, w_node).detach().cpu().numpy()
        bits = int(meta.get("w_bits", 8))
        packing.check_layer(layer, bits, group, values)
        table[w_node.target] = LayerWeight(layer, bits, values)
    return WeightTable(table)


def serialized_bytes(executable) -> int:
    """Bytes of a built executable's serialized form (the VM program and its constants, code
    aside): what `export_library` embeds in the shared library next to the machine code."""
    return int(tvm.get_global_func("runtime.ModulePackImportsToTensor")(executable.mod).shape[0])
