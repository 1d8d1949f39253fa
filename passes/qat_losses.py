"""QAT's losses.

- task: `ctx.loss_fn(output, target)`, or by default cross-entropy for integer targets (class
  ids `[B]` against logits `[B, C]`, or token ids `[B, T]` against `[B, T, V]`) and mean
  squared error for float targets.
- distillation (Hinton et al. 2015): on the output, T^2 * KL(softmax(t/T) || softmax(s/T))
  over the last dimension (or MSE); on chosen intermediates, the MSE normalized by the
  teacher's mean square, sum ||s - t||^2 / sum ||t||^2, so layers of any scale weigh alike.
- EdgeQAT (Shen et al. 2024) on the quantized queries and keys of attention (the operands
  of q @ k^T that are fake-quant outputs): the entropy-guided loss maximizes the entropy of
  their integer codes c = x/s + z (before rounding); for a Gaussian fit of variance v (in steps of the grid)
  that is 1/2 log(2 pi e v), so the loss is -1/2 log v per head. On a fixed grid this is
  EdgeQAT's -1/2 log var(x) up to a constant (a learned static step is held out of it, so it
  shapes x, not the grid); on a run-time grid, whose step follows each row's range, it
  rewards codes that fill the grid, where var(x) alone would only scale the attention logits.
  The distribution-guided loss matches each head's quantized distribution to the float one,
  as the KL divergence of the Gaussian fits,
  KL(N(mt, vt) || N(ms, vs)) = 1/2 (log(vs/vt) + (vt + (mt - ms)^2) / vs - 1).
- attention maps (the attention-map loss of Kim et al. 2022, "Understanding and Improving
  Knowledge Distillation for QAT of Large Transformer Encoders"): KL(t || s) between the
  teacher's and the student's attention probabilities, per query row, averaged over rows and
  layers; what the distorted queries and keys finally change.

`code_entropy` measures what the entropy loss aims at, on the integer codes themselves: the
Shannon entropy in bits of their histogram (at most the bit width).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from qcompiler.errors import TrainingError
from qcompiler.ops import _expand_groups


def task_loss(output: torch.Tensor, target, loss_fn=None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(output, target)
    if not isinstance(target, torch.Tensor):
        raise TrainingError(f"the training target is a {type(target).__name__}; give a tensor "
                            "(or set PassContext.loss_fn to a loss that takes it)")
    if target.is_floating_point():
        if target.shape != output.shape:
            raise TrainingError(f"a float target {list(target.shape)} must have the output's shape {list(output.shape)} "
                                "for the default MSE loss (or set PassContext.loss_fn)")
        return F.mse_loss(output, target)
    if output.dim() != target.dim() + 1 or output.shape[:-1] != target.shape:
        raise TrainingError(f"integer targets {list(target.shape)} do not fit the output {list(output.shape)}: "
                            "the default cross-entropy takes class ids shaped like the output without its last "
                            "dimension (or set PassContext.loss_fn)")
    return F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1))


def distill_output(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, kind: str = "kl") -> torch.Tensor:
    if kind == "mse":
        return feature_loss(student, teacher)
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return kl * t * t


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-12)


def _head_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance per attention head (dim 1 of a [B, H, ...] tensor), else overall."""
    x = x.float()
    if x.dim() >= 4:
        x = x.transpose(0, 1).reshape(x.shape[1], -1)
    else:
        x = x.reshape(1, -1)
    return x.mean(-1), x.var(-1, unbiased=False)


@dataclass(frozen=True)
class CodeGrid:
    """The grid of one quantized query or key: `names` are the nodes the student view captures
    for it, the fake-quant's input, scale and (unless it is a literal, kept as `zero`) zero point."""

    names: tuple[str, ...]
    zero: float
    qmin: int
    qmax: int
    group_size: int
    static: bool

    def codes(self, values: dict) -> torch.Tensor:
        """clamp(x/s + z): the integer codes before rounding (their variance is the codes' less
        the rounding's 1/12), differentiable in x, and in s and z where they are computed from
        x at run time; a static step is held fixed, so the loss shapes x, not the grid."""
        x, s = values[self.names[0]], values[self.names[1]]
        z = values[self.names[2]] if len(self.names) > 2 else torch.tensor(self.zero)
        if self.static:
            s, z = s.detach(), z.detach()
        c = x / _expand_groups(s, x, self.group_size) + _expand_groups(z, x, self.group_size)
        return c.clamp(self.qmin, self.qmax)


def code_grids(fqs: list[torch.fx.Node]) -> list[CodeGrid]:
    grids = []
    for fq in fqs:
        x, scale, zero, qmin, qmax = fq.args[:5]
        node_zero = isinstance(zero, torch.fx.Node)
        names = (x.name, scale.name) + ((zero.name,) if node_zero else ())
        group = fq.args[5] if len(fq.args) > 5 else fq.kwargs.get("group_size", 0)
        grids.append(CodeGrid(names, 0.0 if node_zero else float(zero), qmin, qmax, group, scale.op == "get_attr"))
    return grids


def entropy_loss(codes: list[torch.Tensor]) -> torch.Tensor:
    """-1/2 log(variance) of the codes per head, averaged: minimizing it maximizes their
    Gaussian entropy."""
    terms = [-0.5 * torch.log(_head_moments(c)[1] + 1e-8).mean() for c in codes]
    return torch.stack(terms).mean()


def distribution_loss(quantized: list[torch.Tensor], floats: list[torch.Tensor]) -> torch.Tensor:
    """KL(float || quantized) of per-head Gaussian fits, averaged."""
    terms = []
    for q, f in zip(quantized, floats):
        ms, vs = _head_moments(q)
        mt, vt = _head_moments(f.detach())
        vs, vt = vs + 1e-8, vt + 1e-8
        terms.append((0.5 * (torch.log(vs / vt) + (vt + (mt - ms) ** 2) / vs - 1)).mean())
    return torch.stack(terms).mean()


def attention_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over maps and rows of KL(t || s), the last dimension a probability distribution
    (masked positions are 0 in both and add nothing)."""
    terms = []
    for s, t in zip(student, teacher):
        t = t.detach().float()
        log_s = s.float().clamp_min(1e-12).log()
        terms.append((torch.special.xlogy(t, t) - t * log_s).sum(-1).mean())
    return torch.stack(terms).mean()


@torch.no_grad()
def code_entropy(codes: torch.Tensor, qmin: int, qmax: int) -> float:
    """Shannon entropy (bits) of the integer codes round(`codes`) (`CodeGrid.codes`) take."""
    q = torch.round(codes).flatten().long() - qmin
    p = torch.bincount(q, minlength=qmax - qmin + 1).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())
