"""The fake quantizer QAT trains through: `qc.fake_quant`'s forward and gradients in one pass.

`qc.fake_quant` is a `torch.library` custom op, whose autograd (`qcompiler.ops`) recomputes
the rounding in `setup_context` after the forward has done it, and always forms the
zero-point gradient term once any quantizer parameter is learned. Training views
(`qat_graph.view`) call `fake_quant_train` instead: a `torch.autograd.Function` that computes
the same float operations in the same order (so the forward is bit for bit the op's) and keeps
from them what the backward needs:

    r = x / s,  rr = round(r),  v = rr + z,  q = clamp(v, qmin, qmax),  y = (q - z) * s
    inside = (q == v)                          (v on the grid: the clamp left it alone)
    d y / d x = inside                         (straight-through)
    d y / d s = rr - r inside, q - z outside   (= qmin - z below, qmax - z above: LSQ)
    d y / d z = 0 inside, -s outside           (LSQ+; only formed when z is learned)

About a third of the op's full-size passes over a weight, and no zero-point tensor for the
weights (their zero points are fixed), which on SmolLM2-135M is most of a step's time and
memory.
"""

from __future__ import annotations

import torch
import torch.fx

from qcompiler.ops import _expand_groups, _sum_to_param


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, group_size):
        s = _expand_groups(scale, x, group_size)
        z = _expand_groups(zero_point, x, group_size)
        r = x / s
        v = torch.round(r)
        need_x, need_s, need_z = ctx.needs_input_grad[:3]
        ds = v - r if need_s else None
        del r
        v.add_(z)
        q = torch.clamp(v, quant_min, quant_max)
        inside = q == v if (need_x or need_s or need_z) else None
        del v
        q.sub_(z)  # q - z
        y = (q * s).to(x.dtype)
        ctx.group_size = group_size
        if need_s:
            ds = torch.where(inside, ds, q)
        dz = torch.where(inside, torch.zeros_like(s), -s) if need_z else None
        ctx.save_for_backward(inside, ds, dz, scale, zero_point)
        return y

    @staticmethod
    def backward(ctx, grad):
        inside, ds, dz, scale, zero_point = ctx.saved_tensors
        # the op's grad * inside promotes the mask to float on the fly (slow); the same values
        gx = grad * inside.to(grad.dtype) if ctx.needs_input_grad[0] else None
        gs = _sum_to_param(grad * ds, scale, ctx.group_size) if ctx.needs_input_grad[1] else None
        gz = _sum_to_param(grad * dz, zero_point, ctx.group_size) if ctx.needs_input_grad[2] else None
        return gx, gs, gz, None, None, None


def fake_quant_train(x, scale, zero_point, quant_min: int, quant_max: int, group_size: int = 0):
    """`qc.fake_quant` with its straight-through and LSQ/LSQ+ gradients (see the module doc)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or zero_point.requires_grad)):
        return torch.ops.qc.fake_quant.default(x, scale, zero_point, quant_min, quant_max, group_size)
    return _FakeQuant.apply(x, scale, zero_point, quant_min, quant_max, group_size)


def use_training_fake_quant(g: torch.fx.Graph) -> int:
    """Point every `qc.fake_quant` call of `g` at `fake_quant_train`; returns how many."""
    count = 0
    for node in g.nodes:
        if node.op == "call_function" and node.target is torch.ops.qc.fake_quant.default:
            node.target = fake_quant_train
            count += 1
    return count
