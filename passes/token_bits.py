"""`token-bits`: token importance-aware adaptive activation widths (EdgeQAT, Shen et al. 2024).

A token's importance is the attention it receives: with P = softmax(q k^T / sqrt(d) + mask)
of shape [B, H, T, T],

    imp[b, j] = sum_h sum_i P[b, h, i, j]

At run time the ceil(keep * T) most important tokens of each sequence have the activations
entering the chosen linears quantized per token at `high` bits, the others at `low` bits.
Everything is computed in the graph with ATen ops, so the selection follows the input:

    rank[b, j] = #{i : imp[b,i] > imp[b,j]  or  (imp[b,i] = imp[b,j] and i < j)}   (ties by position)
    L[b, j]    = 2^(high-1)-1  if rank[b, j] < ceil(keep * T)  else  2^(low-1)-1
    s[b, j]    = max_k |x[b, j, k]| / L[b, j],   q = clamp(round(x / s), -(2^(high-1)-1), 2^(high-1)-1)

Symmetric on purpose: |x / s| <= L[b, j] (up to float rounding, which `round` absorbs), so a
low row never leaves its own grid and the one clamp at `high` bits is exact for every row.
(An asymmetric row's round(lo/s) and round(hi/s) may span one level more than its grid.) The
quantized rows are int8 tensors; `convert` turns each such linear into quantize -> linear_int
-> dequantize with the per-row scale times the per-channel weight scale (`convert_dynamic`).

Which linears and which attention: every quantized linear takes the importance of the nearest
attention before it in the graph. In a pre-norm decoder block that is the block's own
attention for o_proj, gate/up and down_proj, and the previous block's attention for q/k/v
(EdgeQAT's previous-layer attention map); linears before the first attention keep the
quantizer `fake-quant` gave them. Runs after `fake-quant` (any activation granularity; KV-cache
quantizers, `kv=`, are left as they are) and before `convert`.

The pass runs the calibration batches through the result and reports the average activation
width over all the quantized linears' input elements (each quantized tensor counted once), in
the pass details and in `gm.meta["qc"]["token_bits"]`, which the compile report prints.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from qcompiler.errors import QuantSpecError
from qcompiler.ir import add_constant, cleanup, example_inputs, op_name
from qcompiler.pass_manager import Pass, PassResult, register
from qcompiler.spec import check_bits

from .attention import find_attention
from .dynamic_quant import dynamic_quantizer
from .stats import _calib_args

A = torch.ops.aten


def _levels(bits: int) -> float:
    return float(2 ** (bits - 1) - 1)


def _is_act_fq(n) -> bool:
    return (isinstance(n, torch.fx.Node) and op_name(n) == "qc.fake_quant"
            and n.meta.get("qc", {}).get("role", "") in ("act", "act_dynamic"))


@register("token-bits")
class TokenBits(Pass):
    """Per-token activation widths at run time (EdgeQAT): the `keep` fraction of tokens that
    receive the most attention are quantized at `high` bits, the rest at `low` bits (symmetric,
    per token), at the inputs of the quantized linears after an attention. Run after fake-quant."""

    high: int = 8
    low: int = 4
    keep: float = 0.25

    def __post_init__(self):
        check_bits(self.high, "high")
        check_bits(self.low, "low")
        if self.high <= self.low:
            raise QuantSpecError(f"token-bits: high={self.high} must be wider than low={self.low} "
                                 "(e.g. high=8,low=4); for one width use fake-quant(a_granularity=token)")
        if not 0 < self.keep <= 1:
            raise QuantSpecError(f"token-bits: keep={self.keep} is the fraction of tokens kept at high bits: "
                                 "give a value in (0, 1], e.g. keep=0.25")

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        attentions = sorted(find_attention(gm), key=lambda a: order[a.softmax])
        if not attentions:
            raise QuantSpecError("token-bits: the model has no attention (matmul(q, k^T) -> softmax -> "
                                 "matmul(p, v)) to rank tokens by; use fake-quant(a_granularity=token) "
                                 "for uniform per-token widths")
        linears = [n for n in gm.graph.nodes if op_name(n) == "aten.linear"
                   and n.meta.get("qc", {}).get("quantized") and not n.meta["qc"].get("weight_only")]
        if not linears:
            raise QuantSpecError("token-bits: no quantized linear layers: run fake-quant (with activations, "
                                 "not weight_only) before token-bits, e.g. fake-quant(ops=linear),token-bits")
        masks: dict = {}  # attention softmax node -> its [B, T, 1] "high" mask node
        quantizers: dict = {}  # (input tensor, softmax) -> the new quantizer
        chosen, skipped = [], {}
        for lin in linears:
            fq = lin.args[0]
            before = [a for a in attentions if order[a.softmax] < order[lin]]
            if not before:
                skipped[lin.name] = "no attention before it"
                continue
            if not _is_act_fq(fq):
                skipped[lin.name] = "its input has no activation quantizer"
                continue
            att = before[-1]
            why = _shape_problem(fq.args[0], att.softmax)
            if why:
                skipped[lin.name] = why
                continue
            key = (fq.args[0], att.softmax)
            if key not in quantizers:
                if att.softmax not in masks:
                    masks[att.softmax] = self._high_mask(gm, att.softmax)
                quantizers[key] = self._quantizer(gm, fq.args[0], masks[att.softmax], lin, att.softmax.name)
            lin.update_arg(0, quantizers[key])
            lin.meta["qc"] = {**lin.meta["qc"], "a_bits": self.high, "a_bits_low": self.low,
                              "a_granularity": "token", "importance": att.softmax.name}
            chosen.append(lin.name)
        if not chosen:
            raise QuantSpecError(f"token-bits: no linear layer can take per-token widths: {skipped}")
        for fq in {lin.args[0] for lin in linears} | {n for n in gm.graph.nodes if _is_act_fq(n)}:
            if not fq.users:
                gm.graph.erase_node(fq)
        cleanup(gm)
        stats = average_width(gm, ctx, self.high, self.low)
        gm.meta["qc"]["token_bits"] = {"high": self.high, "low": self.low, "keep": self.keep, **stats}
        summary = (f"{len(chosen)} linears at {self.high}/{self.low} bits per token (keep {self.keep}); "
                   f"average activation width {stats['avg_bits']:.3f} bits")
        return PassResult(True, summary, {"nodes": chosen, "skipped": skipped, **stats})

    def _high_mask(self, gm, softmax: torch.fx.Node) -> torch.fx.Node:
        """[B, T, 1] float mask: 1.0 for the ceil(keep*T) tokens receiving the most attention."""
        t = int(softmax.meta["val"].shape[-1])
        k = math.ceil(self.keep * t)
        g = gm.graph
        after = softmax.next
        ties = add_constant(gm, f"{softmax.name}_tie_order", torch.ones(t, t, dtype=torch.bool).tril(-1), after)
        with g.inserting_before(after):
            imp = g.call_function(A.sum.dim_IntList, (softmax, [1, 2]))  # [B, T]: attention received
            row = g.call_function(A.unsqueeze.default, (imp, -1))  # imp[b, j] along dim 1
            col = g.call_function(A.unsqueeze.default, (imp, 1))  # imp[b, i] along dim 2
            ahead = g.call_function(A.logical_or.default, (
                g.call_function(A.gt.Tensor, (col, row)),
                g.call_function(A.logical_and.default, (g.call_function(A.eq.Tensor, (col, row)), ties))))
            ahead = g.call_function(A._to_copy.default, (ahead,), {"dtype": torch.float32})
            rank = g.call_function(A.sum.dim_IntList, (ahead, [-1], True))  # [B, T, 1]
            high = g.call_function(A.lt.Scalar, (rank, float(k)))
            mask = g.call_function(A._to_copy.default, (high,), {"dtype": torch.float32})
        mask.meta["qc"] = {"role": "token_mask", "keep": self.keep, "tokens": t, "high_tokens": k}
        return mask

    def _quantizer(self, gm, x, mask, consumer, importance: str) -> torch.fx.Node:
        g = gm.graph
        lo, hi = _levels(self.low), _levels(self.high)
        with g.inserting_before(consumer):
            levels = g.call_function(A.add.Tensor, (g.call_function(A.mul.Tensor, (mask, hi - lo)), lo))
        fq = dynamic_quantizer(gm, x, self.high, [-1], True, consumer, "token", levels=levels)
        fq.meta["qc"].update({"low_bits": self.low, "mask": mask.name, "importance": importance})
        return fq


def _shape_problem(x: torch.fx.Node, softmax: torch.fx.Node) -> str:
    """Why rows of `x` cannot take this attention's token ranking ('' when they can)."""
    p, v = softmax.meta.get("val"), x.meta.get("val")
    if p is None or v is None:
        return "shapes unknown"
    if p.dim() != 4:
        return f"attention probabilities of rank {p.dim()}, expected [B, H, T, T]"
    if not isinstance(p.shape[-1], int):
        return "a symbolic sequence length"
    if v.dim() != 3 or v.shape[1] != p.shape[-1]:
        return f"input of shape {tuple(v.shape)} is not [B, T, C] with T = {p.shape[-1]}"
    return ""


class _Widths(torch.fx.Interpreter):
    """Runs the IR and adds up, for every quantized linear input, elements x width."""

    def __init__(self, gm, high, low):
        super().__init__(gm)
        self.high, self.low = high, low
        by_name = {n.name: n for n in gm.graph.nodes}
        self.fqs = {n.args[0]: by_name.get(n.args[0].meta["qc"].get("mask")) for n in gm.graph.nodes
                    if op_name(n) == "aten.linear" and n.meta.get("qc", {}).get("quantized") and _is_act_fq(n.args[0])}
        self.masks = {m: None for m in self.fqs.values() if m is not None}
        self.bits = self.elements = self.high_rows = self.rows = 0.0

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.masks:  # kept: the interpreter frees values after their last reader
            self.masks[n] = out
        if n in self.fqs:
            x = self.env[n.args[0]]
            row_len = x.shape[-1]
            mask = self.fqs[n]
            if mask is not None:
                m = self.masks[mask].expand(*x.shape[:-1], 1)
                hi = float(m.sum())
                self.high_rows += hi
                self.rows += m.numel()
                self.bits += row_len * (hi * self.high + (m.numel() - hi) * self.low)
            else:
                self.bits += x.numel() * n.meta["qc"]["bits"]
            self.elements += x.numel()
        return out


def average_width(gm, ctx, high: int, low: int) -> dict:
    """Measured on the calibration batches (the example inputs without them)."""
    interp = _Widths(gm, high, low)
    batches = _calib_args(gm, ctx, "token-bits") if ctx is not None and ctx.calib is not None else [example_inputs(gm)]
    with torch.no_grad():
        for args in batches:
            interp.run(*args)
    return {"avg_bits": interp.bits / max(interp.elements, 1),
            "high_token_fraction": interp.high_rows / max(interp.rows, 1)}
