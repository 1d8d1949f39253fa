"""DopQ-ViT's quantizers (Yang et al. 2024, "Towards Distribution-Friendly and Outlier-Aware
Post-Training Quantization for Vision Transformers"), as two passes.

`tanq` (after fake-quant and calibrate): post-softmax activations follow a power law, with
most values near 0 and a few near 1 that matter most. The uniform quantizer of each
attention-probability input is replaced by a companding quantizer on [0, 1]:

    f(x) = (tan(a pi (x - 1/2)) / tan(a pi / 2) + 1) / 2,     x^ = f^-1(uniform_b(f(x)))

with f(0) = 0, f(1) = 1 exact; its 2^b levels f^-1(k / (2^b - 1)) crowd near 0 and near 1
(our reading of the paper's tangent quantizer: the paper gives the shape, the constant a
is searched here per quantizer on calibration data, a in (0, 1), minimizing the squared
error). The graph holds f, a uniform `qc.fake_quant` and f^-1 as plain ops (role
"act_tanq"), so the codes are integers; the matmul they feed stays a float op in `convert`.

`mosf` (before fake-quant): channel-to-layer reparameterization of post-LayerNorm
activations (RepQ-ViT) with the median-based scale (MOSF). Per channel c the calibration
range [m_c, M_c] gives r_c = (M_c - m_c) / median_c(M_c - m_c) and a shift
d_c = -m_c - (M_c - m_c) * median_c(-m_c / (M_c - m_c)); then

    LN'(x) = (LN(x) + d) / r   (gamma / r, (beta + d) / r),   W' = W diag(r),  b' = b - W d

so every channel has the same range and offset and one per-tensor quantizer fits all. The
median (instead of RepQ-ViT's mean) keeps a few outlier channels from shrinking every other
channel's weights. Only LayerNorms read by linear layers alone are changed; others are
reported with the reason. The float function is checked afterwards.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.fx

from qcompiler.errors import QuantSpecError
from qcompiler.ir import add_constant, cleanup, copy_ir, get_attr_tensor, op_name
from qcompiler.pass_manager import Pass, PassResult, register

from .attention import find_attention
from .rotation_graph import _IGNORED
from .stats import check_equivalent, reference_args, watch

A = torch.ops.aten


def tan_compand(x: torch.Tensor, a: float) -> torch.Tensor:
    return (torch.tan(a * math.pi * (x - 0.5)) / math.tan(a * math.pi / 2) + 1) * 0.5


def tan_expand(v: torch.Tensor, a: float) -> torch.Tensor:
    return torch.atan((2 * v - 1) * math.tan(a * math.pi / 2)) / (a * math.pi) + 0.5


def tanq_reference(x: torch.Tensor, bits: int, a: float) -> torch.Tensor:
    levels = 2**bits - 1
    v = torch.round(tan_compand(x.clamp(0, 1), a) * levels) / levels
    return tan_expand(v, a)


class _Sample:
    def __init__(self, n=65536, seed=0):
        self.parts, self.n, self.gen = [], n, torch.Generator().manual_seed(seed)

    def __call__(self, x):
        x = x.detach().flatten().float()
        if x.numel() > self.n:
            x = x[torch.randint(0, x.numel(), (self.n,), generator=self.gen)]
        self.parts.append(x)

    def values(self):
        v = torch.cat(self.parts)
        return v[torch.randint(0, v.numel(), (self.n,), generator=self.gen)] if v.numel() > self.n else v


@register("tanq")
class TanQ(Pass):
    """DopQ-ViT's tangent quantizer for post-softmax activations (the first operand of every
    attention's probs @ v); `bits` 0 keeps each quantizer's width."""

    bits: int = 0
    batches: int = 0

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        targets = []
        for att in find_attention(gm):
            fq = att.pv.args[0]
            if op_name(fq) == "qc.fake_quant" and fq.meta.get("qc", {}).get("role") == "act":
                targets.append(fq)
        if not targets:
            raise QuantSpecError("tanq found no quantized attention probabilities: run fake-quant with "
                                 "ops including matmul first (softmax -> fake_quant -> matmul(p, v))")
        samples = {fq: _Sample() for fq in targets}
        watch(gm, ctx, {fq.args[0]: s for fq, s in samples.items()}, str(self), self.batches)
        chosen = {}
        for fq in targets:
            bits = self.bits or fq.meta["qc"]["bits"]
            v = samples[fq].values().clamp(0, 1)
            grid = [0.1 * i for i in range(1, 10)]
            a = min(grid, key=lambda a: float((tanq_reference(v, bits, a) - v).pow(2).mean()))
            chosen[fq.name] = round(a, 2)
            self._replace(gm, fq, bits, a)
        cleanup(gm)
        return PassResult(True, f"{len(targets)} TanQ quantizers", {"alpha": chosen})

    def _replace(self, gm, fq, bits: int, a: float) -> None:
        g, x = gm.graph, fq.args[0]
        levels, qmin = 2**bits - 1, -(2 ** (bits - 1))
        s = add_constant(gm, f"{fq.name}_tanq_scale", torch.tensor(1.0 / levels), fq)
        z = add_constant(gm, f"{fq.name}_tanq_zp", torch.tensor(float(qmin)), fq)
        with g.inserting_before(fq):
            t = g.call_function(A.tan.default, (g.call_function(A.mul.Tensor, (g.call_function(A.sub.Tensor, (x, 0.5)), a * math.pi)),))
            u = g.call_function(A.mul.Tensor, (g.call_function(A.add.Tensor, (g.call_function(A.div.Tensor, (t, math.tan(a * math.pi / 2))), 1.0)), 0.5))
            q = g.call_function(torch.ops.qc.fake_quant.default, (u, s, z, qmin, qmin + levels, 0))
            w = g.call_function(A.mul.Tensor, (g.call_function(A.sub.Tensor, (g.call_function(A.mul.Tensor, (q, 2.0)), 1.0)), math.tan(a * math.pi / 2)))
            y = g.call_function(A.add.Tensor, (g.call_function(A.div.Tensor, (g.call_function(A.atan.default, (w,)), a * math.pi)), 0.5))
        q.meta["qc"] = {"role": "act_tanq", "bits": bits, "alpha": round(a, 4), "observed": True}
        fq.replace_all_uses_with(y)
        g.erase_node(fq)


class _Range:
    def __init__(self):
        self.lo = self.hi = None

    def __call__(self, x):
        x = x.detach().reshape(-1, x.shape[-1])
        lo, hi = x.amin(0).double(), x.amax(0).double()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)


@register("mosf")
class MOSF(Pass):
    """DopQ-ViT/RepQ-ViT: reparameterize post-LayerNorm channel ranges into one layer-wise
    range, with the median scale (MOSF; reduce=mean is RepQ-ViT's)."""

    reduce: Literal["median", "mean"] = "median"
    batches: int = 0
    tol: float = 1e-3

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        before, plans, skipped = copy_ir(gm), [], {}
        for ln in gm.graph.nodes:
            if op_name(ln) != "aten.layer_norm":
                continue
            readers = [u for u in ln.users if op_name(u) not in _IGNORED]
            bad = [u for u in readers if not (op_name(u) == "aten.linear" and u.args[0] is ln and u.args[1].op == "get_attr")]
            if bad or len(ln.args) < 3 or ln.args[2] is None:
                skipped[ln.name] = (f"its output also feeds {bad[0].name} ({op_name(bad[0])})" if bad
                                    else "it has no weight to reparameterize")
                continue
            plans.append((ln, readers))
        if not plans:
            raise QuantSpecError(f"mosf: no LayerNorm is read by linear layers only ({'; '.join(f'{k}: {v}' for k, v in skipped.items()) or 'none found'})")
        ranges = {ln: _Range() for ln, _ in plans}
        watch(gm, ctx, dict(ranges), str(self), self.batches)
        red = torch.median if self.reduce == "median" else torch.mean
        for ln, readers in plans:
            lo, hi = ranges[ln].lo.clamp_max(0), ranges[ln].hi.clamp_min(0)
            width = (hi - lo).clamp_min(1e-8)
            r = width / red(width)
            d = -lo - width * red(-lo / width)
            gamma = get_attr_tensor(gm, ln.args[2]).detach().double()
            beta = get_attr_tensor(gm, ln.args[3]).detach().double() if len(ln.args) > 3 and ln.args[3] is not None else 0
            args = list(ln.args) + [None] * (5 - len(ln.args))
            args[2] = add_constant(gm, f"{ln.name}_mosf_weight", (gamma / r).float(), ln)
            args[3] = add_constant(gm, f"{ln.name}_mosf_bias", ((beta + d) / r).float(), ln)
            args[4] = args[4] if args[4] is not None else 1e-5
            ln.args = tuple(args)
            for lin in readers:
                w = get_attr_tensor(gm, lin.args[1]).detach().double()
                b = get_attr_tensor(gm, lin.args[2]).detach().double() if len(lin.args) > 2 and lin.args[2] is not None else 0
                largs = list(lin.args) + [None] * (3 - len(lin.args))
                largs[1] = add_constant(gm, f"{lin.name}_mosf_weight", (w * r.reshape(1, -1)).float(), lin)
                largs[2] = add_constant(gm, f"{lin.name}_mosf_bias", (b - w @ d).float(), lin)
                lin.args = tuple(largs)
        cleanup(gm)
        err = check_equivalent(before, gm, reference_args(gm, ctx), self.tol, str(self),
                               {ln.name for ln, _ in plans})
        return PassResult(True, f"reparameterized {len(plans)} LayerNorms ({self.reduce}), {len(skipped)} left",
                          {"reparameterized": [ln.name for ln, _ in plans], "skipped": skipped, "max_rel_error": err})
