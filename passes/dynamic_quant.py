"""Dynamic activation quantizers for `fake-quant`: per token, and the KV cache.

A dynamic quantizer computes its scale from the tensor it quantizes, at run time, with
ordinary ATen ops in the graph, then applies `qc.fake_quant` with that scale:

    symmetric:   s = max|x| / qmax over `dims` (kept),  z = 0
    asymmetric:  lo = min(min x, 0), hi = max(max x, 0),  s = (hi - lo) / (qmax - qmin),
                 z = qmin - round(lo / s)

With a clip ratio c in (0, 1) (QuaRot's activation clipping: 0.9 for 4-bit activations,
0.95 for the 4-bit KV cache) the range shrinks to c times the extremes and the values
beyond it saturate at the grid's ends:

    symmetric:   s = max|x| / (qmax / c)        (one division; the constant is qmax / c)
    asymmetric:  lo = min(min x, 0) * c, hi = max(max x, 0) * c, then as above

Per token reduces over the last dim (one scale per row). KV-cache quantization (KIVI, Liu
et al. 2024) quantizes keys per channel (reducing over the tokens, dim -2 of [B, H, T, D],
so each channel of the cache has its scale over the window) and values per token (over
dim -1). Their `meta["qc"]` role is "act_dynamic": `calibrate` leaves them alone; `convert`
makes a linear behind a symmetric per-token quantizer an integer linear with the run-time
row scales (`convert_dynamic`) and keeps the other ops they feed (asymmetric rows, the KV
cache's matmuls) in float simulation.
"""

from __future__ import annotations

import torch
import torch.fx

from qcompiler.errors import QuantSpecError

from .attention import find_attention

A = torch.ops.aten


def dynamic_quantizer(gm, x: torch.fx.Node, bits: int, dims: list[int], symmetric: bool,
                      before: torch.fx.Node, what: str, levels: torch.fx.Node | None = None,
                      clip: float = 1.0) -> torch.fx.Node:
    """Insert s, z = f(x) and fake_quant(x, s, z) before `before`; returns the fake_quant node.
    `levels` (symmetric only): a float tensor node of per-row qmax values (at most `bits`'
    2^(b-1)-1) dividing max|x| instead of the fixed qmax: rows with fewer levels never reach
    past their own grid, so the clamp at `bits` leaves them on it (`token_bits`).
    `clip`: the clip ratio in (0, 1] (module docstring); not combined with `levels`, whose
    rows must stay on their own grid."""
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if symmetric else -qmax - 1
    if levels is not None and clip != 1.0:
        raise QuantSpecError(f"{what}: a clip ratio ({clip}) cannot be combined with per-row levels")
    g = gm.graph
    with g.inserting_before(before):
        if symmetric:
            amax = g.call_function(A.amax.default, (g.call_function(A.abs.default, (x,)), dims, True))
            den = float(qmax) / clip if levels is None else levels
            s = g.call_function(A.clamp_min.default, (g.call_function(A.div.Tensor, (amax, den)), 1e-8))
            z = g.call_function(A.mul.Tensor, (s, 0.0))
        else:
            lo = g.call_function(A.clamp_max.default, (g.call_function(A.amin.default, (x, dims, True)), 0.0))
            hi = g.call_function(A.clamp_min.default, (g.call_function(A.amax.default, (x, dims, True)), 0.0))
            if clip != 1.0:
                lo = g.call_function(A.mul.Tensor, (lo, clip))
                hi = g.call_function(A.mul.Tensor, (hi, clip))
            rng = g.call_function(A.sub.Tensor, (hi, lo))
            s = g.call_function(A.clamp_min.default, (g.call_function(A.div.Tensor, (rng, float(qmax - qmin))), 1e-8))
            z = g.call_function(A.rsub.Scalar, (g.call_function(A.round.default, (g.call_function(A.div.Tensor, (lo, s)),)), qmin))
        fq = g.call_function(torch.ops.qc.fake_quant.default, (x, s, z, qmin, qmax, 0))
    if "val" in x.meta:
        fq.meta["val"] = x.meta["val"]
    fq.meta["qc"] = {"role": "act_dynamic", "bits": bits, "symmetric": symmetric, "granularity": what,
                     "dims": list(dims), **({"clip": clip} if clip != 1.0 else {})}
    return fq


def check_clip(value: float, option: str) -> None:
    """A clip ratio must lie in (0, 1] (1 = no clipping)."""
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise QuantSpecError(f"{option}={value}: a clip ratio is the fraction of max|x| kept, give a value "
                             f"in (0, 1] (1 = no clipping; e.g. 0.9 for 4-bit activations, 0.95 for kv=4)")


def quantize_kv(gm, bits: int, symmetric: bool, clip: float = 1.0) -> list[str]:
    """Keys per channel and values per token at every attention found, with clip ratio
    `clip`; returns the attention score nodes whose cache was quantized."""
    done = []
    for att in find_attention(gm):
        kq = dynamic_quantizer(gm, att.k, bits, [-2], symmetric, att.k_t, "kv-key-channel", clip=clip)
        att.k_t.update_arg(0, kq)
        vq = dynamic_quantizer(gm, att.v, bits, [-1], symmetric, att.pv, "kv-value-token", clip=clip)
        att.pv.update_arg(1, vq)
        done.append(att.scores.name)
    return done
