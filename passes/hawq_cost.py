"""The layers `hawq` allocates widths to, and what each width costs them.

A layer is a float `aten.linear` / `aten.conv2d` whose weight is a constant (get_attr). Its
shapes come from one run on the example inputs. Costs per (layer, weight bits b):

- size (`budget_kb`, KiB): n s / 8 bytes of weights plus 4 bytes per float32 scale (one per
  output channel, or per group of `group` inputs of a linear row, as `fake-quant` makes them),
  s the width the backends store a b-bit weight at (2, 4, 8 packed; 3, 5, 6, 7 in int8);
- BOPs (`budget_bops`): b * a_bits * MACs, MACs = output elements x (C/groups x KH x KW) for a
  conv, x in_features for a linear, at the example inputs' shapes;
- latency (`budget_latency`): measured on the target (`backends/layer_costs.py`: host ms or
  arm instruction counts), each (layer, b) compiled as a model of its own through the same
  `fake-quant,calibrate,convert` pipeline and backend as a whole model.

`quant_error(layer, b)` = ||Q_b(W) - W||^2 with `fake-quant`'s grid and scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from qcompiler.ir import example_inputs, get_attr_tensor, op_name

from .fake_quant import weight_grid, weight_scale

KINDS = {"aten.linear": "linear", "aten.conv2d": "conv2d"}


@dataclass
class Layer:
    node: torch.fx.Node
    kind: str  # linear | conv2d
    weight: torch.Tensor
    has_bias: bool
    x_shape: tuple
    out_shape: tuple
    conv: tuple = ()  # (stride, padding, dilation, groups)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def macs(self) -> int:
        return math.prod(self.out_shape) * (self.weight.numel() // self.weight.shape[0])


def find_layers(gm: torch.fx.GraphModule, skip=()) -> list[Layer]:
    """Weight-carrying float layers in graph order, with their shapes on the example inputs."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and op_name(n) in KINDS and n.name not in skip
             and isinstance(n.args[1], torch.fx.Node) and n.args[1].op == "get_attr"]
    shapes = {}

    class _Shapes(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in nodes:
                shapes[n] = (tuple(self.env[n.args[0]].shape), tuple(out.shape))
            return out

    with torch.no_grad():
        _Shapes(gm).run(*example_inputs(gm))
    layers = []
    for n in nodes:
        kind = KINDS[op_name(n)]
        args = list(n.args) + [None] * (7 - len(n.args))
        conv = ()
        if kind == "conv2d":
            kw = n.kwargs
            conv = (tuple(args[3] or kw.get("stride", (1, 1))), tuple(args[4] or kw.get("padding", (0, 0))),
                    tuple(args[5] or kw.get("dilation", (1, 1))), int(args[6] or kw.get("groups", 1)))
        w = get_attr_tensor(gm, n.args[1]).detach()
        layers.append(Layer(n, kind, w, args[2] is not None, *shapes[n], conv))
    return layers


def _group(layer: Layer, group: int) -> int:
    """The group size fake-quant will use for this layer (0: per channel)."""
    if layer.kind != "linear" or not group or group >= layer.weight.shape[1]:
        return 0
    return group


def quant_error(layer: Layer, bits: int, group: int) -> float:
    """||Q_b(W) - W||^2 on fake-quant's symmetric grid (max-abs scale per channel or group)."""
    g = _group(layer, group)
    w = layer.weight.float()
    scale = weight_scale(w, bits, g)
    qmin, qmax = weight_grid(bits)
    q = torch.ops.qc.fake_quant(w, scale, torch.zeros_like(scale), qmin, qmax, g)
    return float((q.double() - w.double()).pow(2).sum())


def stored_bits(bits: int) -> int:
    """The width the backends store a weight of `bits` at (`backends/weights.py`)."""
    return bits if bits in (2, 4, 8) else 8


def size_bytes(layer: Layer, bits: int, group: int) -> float:
    g = _group(layer, group)
    n = layer.weight.shape[0]
    scales = n * -(-layer.weight.shape[1] // g) if g else n
    return layer.weight.numel() * stored_bits(bits) / 8 + 4 * scales


def bops(layer: Layer, bits: int, a_bits: int) -> float:
    return float(bits * a_bits * layer.macs)


def _cost_key(layer: Layer, bits: int, a_bits: int, group: int) -> str:
    conv = "" if not layer.conv else "|s{}p{}d{}g{}".format(*layer.conv)
    return (f"{layer.kind}|x{list(layer.x_shape)}|w{list(layer.weight.shape)}|bias{int(layer.has_bias)}{conv}"
            f"|w{bits}a{a_bits}|group{_group(layer, group)}")


def single_layer(layer: Layer, bits: int, a_bits: int, group: int):
    """The layer as a model of its own, traced and converted at width `bits`: (IR, inputs)."""
    from qcompiler.context import PassContext
    from qcompiler.frontends.pytorch import trace
    from qcompiler.pass_manager import PassManager

    w = layer.weight
    if layer.kind == "linear":
        m = torch.nn.Linear(w.shape[1], w.shape[0], bias=layer.has_bias)
    else:
        stride, padding, dilation, groups = layer.conv
        m = torch.nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride, padding, dilation, groups,
                            bias=layer.has_bias)
    with torch.no_grad():
        m.weight.copy_(w)
        if layer.has_bias:
            m.bias.zero_()
    x = torch.randn(layer.x_shape, generator=torch.Generator().manual_seed(0))
    ir = trace(m.eval(), (x,))
    g = _group(layer, group)
    gran = f",granularity=group,group={g}" if g else ""
    PassManager.parse(f"fake-quant(w={bits},a={a_bits}{gran}),calibrate,convert").run(
        ir, PassContext(calib=[x], verify=False, timing=False))
    return ir, (x,)


def latency_table(layers: list[Layer], bits: tuple, a_bits: int, group: int, target: str, progress=None):
    """[layer][bits] measured costs (and their unit) on `target`, from the cache when there."""
    from qcompiler.backends import layer_costs

    entries = [(_cost_key(layer, b, a_bits, group), lambda layer=layer, b=b: single_layer(layer, b, a_bits, group))
               for layer in layers for b in bits]
    flat = layer_costs.costs(entries, target, progress)
    return [flat[i * len(bits):(i + 1) * len(bits)] for i in range(len(layers))], layer_costs.unit(target)
