"""`fake-quant`: insert `qc.fake_quant` on the weights and input activations of compute ops.

Weights are quantized symmetrically on the grid {-(2^(b-1)-1), ..., 2^(b-1)-1} with scale
s = max|W| / (2^(b-1)-1) per output channel, or per group of `group` consecutive input
elements (linear layers; the last group of a row may be shorter). Convolutions are always
per output channel.

Activations entering a quantized op get one quantizer per tensor, asymmetric on
[-2^(b-1), 2^(b-1)-1] with a zero point, or symmetric on +-(2^(b-1)-1); its range is left
for `calibrate` to set (`meta["qc"]["observed"]` is False until then). Ops that share an
input share its quantizer, so the integer graph quantizes that tensor once.

With `a_granularity=token`, activations are quantized per row with a scale computed at run
time, and `kv=<bits>` quantizes attention's keys per channel and values per token
(`dynamic_quant`), on the activations' grid or, with `kv_symmetric=true|false`, on its own
(QuaRot: symmetric activations, asymmetric KV cache; the KV products stay float simulation).
`a_clip` and `kv_clip` (in (0, 1], default 1 = no clipping) shrink those run-time ranges
to that fraction of the extremes (QuaRot: 0.9 for 4-bit activations, 0.95 for a 4-bit KV
cache); static per-tensor ranges are clipped by `calibrate`'s observers
(mse, percentile, kl) instead.

Per-node widths set by an analysis (`node.meta["qc"]["w_bits"]` / `["a_bits"]`) win over the
pass options.

With `weight_only`, only the weights of linear layers are quantized (activations stay float;
`convert` makes `qc.linear_weight_only`); conv2d and matmul are left float.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.fx

from qcompiler.errors import QuantSpecError
from qcompiler.ir import add_constant, get_attr_tensor, op_name
from qcompiler.pass_manager import Pass, PassResult, register
from qcompiler.spec import check_bits

from .dynamic_quant import check_clip

# op name -> positions of (activation inputs, weight input or None)
QUANTIZABLE = {
    "linear": ("aten.linear", (0,), 1),
    "conv2d": ("aten.conv2d", (0,), 1),
    "matmul": ("aten.matmul", (0, 1), None),
}


def weight_grid(bits: int) -> tuple[int, int]:
    q = 2 ** (bits - 1) - 1
    return -q, q


def act_grid(bits: int, symmetric: bool) -> tuple[int, int]:
    q = 2 ** (bits - 1) - 1
    return (-q, q) if symmetric else (-q - 1, q)


def weight_scale(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Max-abs symmetric scale per output channel ([N,1,...]) or per group ([N, G])."""
    qmax = 2 ** (bits - 1) - 1
    if group:
        n, k = w.shape
        groups = -(-k // group)
        padded = torch.nn.functional.pad(w.abs(), (0, groups * group - k))
        amax = padded.reshape(n, groups, group).amax(-1)
    else:
        amax = w.abs().reshape(w.shape[0], -1).amax(-1).reshape(-1, *([1] * (w.dim() - 1)))
    return (amax.clamp_min(1e-8) / qmax).float()


@register("fake-quant")
class FakeQuant(Pass):
    """Insert fake-quant on weights (symmetric, per channel or per group) and on the input
    activations (per tensor) of the chosen ops; activation ranges are set by `calibrate`.
    weight_only: quantize only the weights of linear layers (float activations)."""

    w: int = 8
    a: int = 8
    granularity: Literal["channel", "group"] = "channel"
    group: int = 128
    a_symmetric: bool = False
    ops: tuple[str, ...] = ("linear", "conv2d", "matmul")
    skip: tuple[str, ...] = ()
    weight_only: bool = False
    a_granularity: Literal["tensor", "token"] = "tensor"
    kv: int = 0
    a_clip: float = 1.0
    kv_clip: float = 1.0
    kv_symmetric: Literal["auto", "true", "false"] = "auto"

    def __post_init__(self):
        check_bits(self.w, "w")
        check_bits(self.a, "a")
        check_clip(self.a_clip, "a_clip")
        check_clip(self.kv_clip, "kv_clip")
        if self.a_clip != 1.0 and self.a_granularity != "token":
            raise QuantSpecError(f"a_clip={self.a_clip} clips run-time per-token ranges: give it with "
                                 "a_granularity=token; per-tensor ranges are clipped by calibrate(observer=mse|percentile|kl)")
        if self.kv_clip != 1.0 and not self.kv:
            raise QuantSpecError(f"kv_clip={self.kv_clip} clips the KV cache's ranges: give it with kv=<bits>")
        if self.kv_symmetric != "auto" and not self.kv:
            raise QuantSpecError(f"kv_symmetric={self.kv_symmetric} sets the KV cache's grid: give it with kv=<bits>")
        if self.kv:  # KV cache: keys per channel, values per token (`dynamic_quant`)
            check_bits(self.kv, "kv")
            if "matmul" in self.ops:
                raise QuantSpecError("kv=... quantizes attention's keys and values itself: "
                                     "give ops=linear (or linear;conv2d) with it")
        unknown = [o for o in self.ops if o not in QUANTIZABLE]
        if unknown:
            raise QuantSpecError(f"ops {unknown} cannot be quantized; choose from {', '.join(QUANTIZABLE)}")
        if self.granularity == "group" and self.group <= 0:
            raise QuantSpecError(f"group={self.group}: a group size must be positive")

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        kinds = [o for o in self.ops if o == "linear" or not self.weight_only]
        targets = {QUANTIZABLE[o][0]: o for o in kinds}
        act_quantizers: dict[tuple, torch.fx.Node] = {}
        done = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or op_name(node) not in targets or node.name in self.skip:
                continue
            if node.meta.get("qc", {}).get("quantized"):
                continue
            kind = targets[op_name(node)]
            _, act_pos, w_pos = QUANTIZABLE[kind]
            if w_pos is not None and not (isinstance(node.args[w_pos], torch.fx.Node) and node.args[w_pos].op == "get_attr"):
                continue  # weight computed at run time: leave float
            ann = node.meta.get("qc", {})
            w_bits, a_bits = ann.get("w_bits", self.w), ann.get("a_bits", self.a)
            group = self.group if (self.granularity == "group" and kind == "linear") else 0
            if w_pos is not None:
                group = self._quantize_weight(gm, node, w_pos, w_bits, group)
            for pos in () if self.weight_only else act_pos:
                key = (node.args[pos], a_bits, self.a_symmetric)
                if key not in act_quantizers:
                    act_quantizers[key] = self._act_quantizer(gm, node.args[pos], a_bits, node)
                node.update_arg(pos, act_quantizers[key])
            node.meta["qc"] = {
                **ann, "quantized": True, "kind": kind,
                **({"weight_only": True} if self.weight_only else {"a_bits": a_bits}),
                **({"w_bits": w_bits, "granularity": "group" if group else "channel", "group_size": group}
                   if w_pos is not None else {}),
            }
            done.append(node.name)
        if self.kv:
            from .dynamic_quant import quantize_kv

            sym = self.a_symmetric if self.kv_symmetric == "auto" else self.kv_symmetric == "true"
            done += quantize_kv(gm, self.kv, sym, self.kv_clip)
        gm.recompile()
        return PassResult(bool(done), f"quantized {len(done)} ops", {"nodes": done})

    def _quantize_weight(self, gm, node, pos, bits, group):
        w_node = node.args[pos]
        w = get_attr_tensor(gm, w_node).detach()
        if group and (w.dim() != 2 or group >= w.shape[1]):
            group = 0  # one group spanning the row is per-channel quantization
        scale = weight_scale(w, bits, group)
        qmin, qmax = weight_grid(bits)
        s = add_constant(gm, f"{node.name}_w_scale", scale, node)
        z = add_constant(gm, f"{node.name}_w_zp", torch.zeros_like(scale), node)
        with gm.graph.inserting_before(node):
            fq = gm.graph.call_function(torch.ops.qc.fake_quant.default, (w_node, s, z, qmin, qmax, group))
        fq.meta["qc"] = {"role": "weight", "bits": bits, "group_size": group, "source": node.name}
        node.update_arg(pos, fq)
        return group

    def _act_quantizer(self, gm, x, bits, consumer):
        if self.a_granularity == "token":  # dynamic: one scale per row, computed at run time
            from .dynamic_quant import dynamic_quantizer

            return dynamic_quantizer(gm, x, bits, [-1], self.a_symmetric, consumer, "token", clip=self.a_clip)
        qmin, qmax = act_grid(bits, self.a_symmetric)
        s = add_constant(gm, f"{x.name}_a_scale", torch.tensor(1.0), consumer)
        z = add_constant(gm, f"{x.name}_a_zp", torch.tensor(0.0), consumer)
        with gm.graph.inserting_before(consumer):
            fq = gm.graph.call_function(torch.ops.qc.fake_quant.default, (x, s, z, qmin, qmax, 0))
        fq.meta["qc"] = {"role": "act", "bits": bits, "symmetric": self.a_symmetric, "observed": False}
        return fq
