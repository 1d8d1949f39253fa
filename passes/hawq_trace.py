"""Hutchinson's estimate of each layer's average Hessian trace, for `hawq` (HAWQ-V2, Dong et
al. 2020, "HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks").

For a loss L(w) over all layers' weights w = (w_1, ..., w_L) and Rademacher vectors v (entries
+-1 with equal probability, independent across layers),

    E[ v_l^T (H v)_l ] = tr(H_ll),     H = d^2 L / dw^2,

since the cross terms v_l^T H_lm v_m (m != l) and v_l,i v_l,j (i != j) have mean zero. One
Hessian-vector product over the whole model therefore gives one sample of every layer's trace.
Samples are drawn until, for every layer, the standard error of the running mean is under
`tol` times its magnitude (after `min_samples`), or `max_samples` are spent; layers that did
not get there are reported, and their running mean is used (stated in the pass result).

Many layers make the cross terms dominate the variance (EfficientNet-Lite0: relative standard
errors of 50-1000% after 16 samples, some means negative); `per_layer` then takes one product
per layer with v zero elsewhere: every sample v_l^T H_ll v_l is >= 0 for a PSD H and no cross
term is left, at L products per sample (layers that have converged stop sampling).

Hessian-vector products come from double backward, Hv = d/dw (g(w) . v) with g = dL/dw built
with `create_graph=True`. Where an op has no double backward, the product is taken from
central finite differences of gradients instead,

    Hv ~ (g(w + eps v) - g(w - eps v)) / (2 eps),

with one eps = fd_eps * rms(w) over all layers' weights (a directional derivative along v, so
each sample equals double backward's up to O(eps^2) and rounding; exact for a quadratic loss).

The loss (`model_hvp`) compares the IR's output on each calibration batch with the float
model's own output on that batch (no labels needed): `kl` = KL(softmax(float) || softmax(out))
over the last dimension (classifiers), `mse` = mean squared difference. At w = w_float both are
zero with zero gradient, so H is their Gauss-Newton matrix (positive semidefinite).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx

from qcompiler.ir import op_name


@dataclass
class TraceEstimate:
    """A layer's average Hessian trace tr(H_ll)/n_l: `mean` over `samples` Hutchinson samples,
    its standard error, whether it met the tolerance, and how H v was computed."""

    mean: float
    std_error: float
    samples: int
    converged: bool
    method: str  # "double-backward" | "finite-difference"

    @property
    def relative_error(self) -> float:
        return self.std_error / abs(self.mean) if self.mean else math.inf


class _Running:
    """Running mean and variance (Welford)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    def std_error(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1) / self.n) if self.n > 1 else math.inf

    def converged(self, tol: float) -> bool:
        return self.n > 1 and self.std_error() <= tol * abs(self.mean) + 1e-30


def rademacher(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


def hutchinson(hvp: Callable[[dict, int], dict], weights: dict[str, torch.Tensor], tol: float = 0.1,
               min_samples: int = 8, max_samples: int = 64, seed: int = 0,
               method: str = "double-backward", per_layer: bool = False) -> dict[str, TraceEstimate]:
    """Average Hessian trace per block of `weights` (name -> tensor). `hvp(vs, i)` returns
    {name: (H v)_name} for the blocks in vs (Rademacher vectors; blocks not in vs are held
    fixed) on sample i (i picks the data batch). `per_layer`: one product per block and sample,
    v zero outside the block, so no cross terms (each sample v^T H_ll v >= 0 when H is PSD),
    and blocks that have converged get no more samples; else one product for all blocks."""
    g = torch.Generator().manual_seed(seed)
    stats = {k: _Running() for k in weights}
    for i in range(max_samples):
        vs = {k: rademacher(w.shape, g).to(w.dtype) for k, w in weights.items()}
        if per_layer:
            todo = [k for k, s in stats.items() if i < min_samples or not s.converged(tol)]
            hv = {k: hvp({k: vs[k]}, i)[k] for k in todo}
        else:
            hv = hvp(vs, i)
        for k in hv:
            stats[k].add(float((vs[k] * hv[k]).sum()) / weights[k].numel())
        if i + 1 >= min_samples and all(s.converged(tol) for s in stats.values()):
            break
    return {k: TraceEstimate(s.mean, s.std_error(), s.n, s.converged(tol), method) for k, s in stats.items()}


# ---------------------------------------------------------------- the model's loss


class _Swapped(torch.fx.Interpreter):
    """Runs the IR with some get_attr tensors replaced (the weights being differentiated) and
    activation fake-quants bypassed (the float function)."""

    def __init__(self, gm, swap: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.swap = swap

    def fetch_attr(self, target: str):
        return self.swap[target] if target in self.swap else super().fetch_attr(target)

    def run_node(self, n):
        if op_name(n) == "qc.fake_quant" and n.meta.get("qc", {}).get("role", "").startswith("act"):
            return self.env[n.args[0]]
        return super().run_node(n)


def _first_output(out) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def output_loss(out: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "kl":
        c = out.shape[-1]
        p = ref.reshape(-1, c).log_softmax(-1)
        return torch.nn.functional.kl_div(out.reshape(-1, c).log_softmax(-1), p, log_target=True,
                                          reduction="batchmean")
    return (out - ref).pow(2).mean()


class ModelHVP:
    """H v of `output_loss(IR(x), float output)` w.r.t. the weight tensors named by `targets`
    (get_attr targets) on calibration batch i mod len(batches). Double backward first; if any
    op lacks it (or `method` says so), central differences of gradients; `self.method` says
    which ran, `self.fallback_reason` why."""

    def __init__(self, gm, targets: list[str], batches: list[tuple], loss: str, method: str = "auto",
                 fd_eps: float = 1e-3):
        self.gm, self.targets, self.batches, self.loss = gm, targets, batches, loss
        self.weights = {t: _fetch(gm, t).detach().float() for t in targets}
        with torch.no_grad():
            self.refs = [_first_output(_Swapped(gm, {}).run(*b)).detach() for b in batches]
        self.method = "finite-difference" if method == "finite-difference" else "double-backward"
        self.allow_fallback = method == "auto"
        self.fallback_reason = ""
        sq = sum(float(w.double().pow(2).sum()) for w in self.weights.values())
        self.eps = fd_eps * max(math.sqrt(sq / sum(w.numel() for w in self.weights.values())), 1e-12)

    def _grads(self, ws: dict, keys: list, i: int, create_graph: bool) -> list[torch.Tensor]:
        batch = self.batches[i % len(self.batches)]
        out = _first_output(_Swapped(self.gm, ws).run(*batch))
        loss = output_loss(out, self.refs[i % len(self.batches)], self.loss)
        return list(torch.autograd.grad(loss, [ws[t] for t in keys], create_graph=create_graph))

    def __call__(self, vs: dict, i: int) -> dict:
        if self.method == "double-backward":
            try:
                return self._double_backward(vs, i)
            except RuntimeError as e:  # e.g. "derivative for ... is not implemented"
                if not self.allow_fallback:
                    raise
                self.method, self.fallback_reason = "finite-difference", f"{type(e).__name__}: {str(e)[:200]}"
        return self._finite_difference(vs, i)

    def _double_backward(self, vs, i):
        keys = list(vs)
        with torch.enable_grad():
            ws = {t: w.clone().requires_grad_(t in vs) for t, w in self.weights.items()}
            grads = self._grads(ws, keys, i, create_graph=True)
            dot = sum((g * vs[t]).sum() for g, t in zip(grads, keys))
            hv = torch.autograd.grad(dot, [ws[t] for t in keys])
        return {t: h.detach() for t, h in zip(keys, hv)}

    def _finite_difference(self, vs, i):
        keys = list(vs)

        def grads(sign):
            with torch.enable_grad():
                ws = {t: (w + sign * self.eps * vs[t] if t in vs else w).requires_grad_(t in vs)
                      for t, w in self.weights.items()}
                return self._grads(ws, keys, i, create_graph=False)

        plus, minus = grads(1.0), grads(-1.0)
        return {t: ((p - m) / (2 * self.eps)).detach() for t, p, m in zip(keys, plus, minus)}


def _fetch(gm, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
