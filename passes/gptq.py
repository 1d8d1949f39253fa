"""`gptq`: Hessian-aware rounding of linear weights (GPTQ, Frantar et al. 2023).

Runs after `fake-quant` and rounds each quantized linear's weight on its weight quantizer's
grid (bits, per-channel or per-group max-abs scales) so as to minimize the layer's output
error on calibration data, ||X W^T - X Q^T||^2, instead of rounding each weight to the
nearest level. With H = X^T X / n (+ damp * mean(diag H) * I), columns are quantized one
at a time and the error of column i is spread over the columns not yet quantized:

    q_i = quant(w_i),   e = (w_i - q_i) / [H^-1]_ii,   w_j -= e [H^-1]_ij   (j > i)

using the upper Cholesky factor of H^-1, in lazy blocks of `block` columns. `act_order`
quantizes columns in order of decreasing diag(H) (the most salient inputs first, while
there is the most freedom to compensate); scales are computed from the original weights
("static groups"), so act_order and groups combine and the stored format does not change.
Columns that never see a non-zero input are zeroed. Practices kept from the study of
gradient-based PTQ ("Gradient-Based Post-Training Quantization: Challenging the Status
Quo", Yvinec et al. 2023): damping relative to the mean diagonal, ordering by salience,
and calibration statistics of float inputs gathered once (not layer-sequentially here:
by default all Hessians come from one float pass over the calibration data). With
`sequential`, layers are rounded one at a time in graph order, all calibration batches
stepped together, and each Hessian is taken from the inputs the layer sees in the partly
quantized model: earlier layers already rounded, activation quantizers applied (GPTQ's
own sequential mode, which QuaRot uses for W4A4).

`group=-1` keeps the quantizers' grouping; `group=0` (per channel) or `group=g` sets it
(scales recomputed). With `clip`, each row's (or group's) scale is shrunk from max-abs to
r * max-abs, r searched on a grid down to `clip_min`, minimizing the rounding error weighted
by diag(H) (the diagonal of the proxy error: how much each input matters), before GPTQ
rounds (the weight-clipping search GPTQ/QuaRot use at 4 bits). Each layer's proxy error
tr((W-Q) H (W-Q)^T) is reported next to round-to-nearest's (on the original scales).

Refinements on the full Hessian (all off by default):
- `search=n` (n >= 2): GPTQ is run with the scales (clip-searched or max-abs) times each of
  1 and n factors from 1.1 down to 0.8; the layer keeps the rounding with the least proxy
  error (the diagonal clip search ignores how GPTQ's compensation moves the error).
- `refit=r`: r rounds of GPTQ then a scale refit, each round starting from the scales the
  last one refit, the best round kept. The refit keeps GPTQ's integer codes and solves each
  row's group scales by least squares under H (groups coupled through H); a row keeps its
  scales where that does not lower its error.
- `float_target` (with `sequential`): each layer rounds toward the float model's outputs
  from the inputs it sees in the partly quantized model, min ||X~ Q^T - X W^T||^2, i.e.
  GPTQ on W' = W X^T X~ (X~^T X~ + damp)^-1 with H = X~^T X~ (the "asymmetric calibration" of
  GPTAQ, a.k.a. GPTQv2): a layer makes up for the error of the layers before it.
"""

from __future__ import annotations

import torch
import torch.fx

from qcompiler.errors import QuantSpecError
from qcompiler.ir import add_constant, cleanup, get_attr_tensor, op_name
from qcompiler.pass_manager import Pass, PassResult, register

from .stats import run_lockstep, watch


class Hessian:
    def __init__(self):
        self.sum, self.count = None, 0

    def __call__(self, x):
        x = x.detach().reshape(-1, x.shape[-1]).double()
        h = x.T @ x
        self.sum = h if self.sum is None else self.sum + h
        self.count += x.shape[0]

    def value(self):
        return self.sum / max(self.count, 1)


def _scales_for_columns(scale: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """[N, K] scale of every weight element (per channel [N, 1] or per group [N, G])."""
    if group:
        return scale.repeat_interleave(group, dim=1)[:, :k]
    return scale.reshape(-1, 1).expand(-1, k)


def clipped_scale(w, h_diag, scale, group: int, qmin: int, qmax: int, lowest: float = 0.5, steps: int = 20):
    """Per row or group, the scale r * scale (r in [lowest, 1]) with the least rounding error
    sum_k h_k (w_k - q_k)^2; `scale` is the max-abs scale ([N, 1] or [N, G])."""
    w, hd, scale = w.double(), h_diag.double().reshape(1, -1), scale.double()
    n, k = w.shape
    g = group or k
    pad = -(-k // g) * g - k
    wp = torch.nn.functional.pad(w, (0, pad)).reshape(n, -1, g)
    hp = torch.nn.functional.pad(hd, (0, pad)).reshape(1, -1, g)
    base = scale.reshape(n, -1, 1)
    best_err = torch.full(base.shape[:2], float("inf"), dtype=torch.float64)
    best = base.clone()
    for r in torch.linspace(1.0, lowest, steps, dtype=torch.float64):
        s = base * r
        err = (hp * (wp - torch.clamp(torch.round(wp / s), qmin, qmax) * s) ** 2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(-1), s, best)
    return best.reshape(scale.shape).float()


def gptq_quantize(w, h, scale, qmin, qmax, damp=0.01, act_order=True, block=128):
    """GPTQ on one weight [N, K] with its per-element scale [N, K]; returns Q on the grid."""
    w, h, scale = w.double().clone(), h.double().clone(), scale.double()
    k = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype)
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k)
    w, h, scale = w[:, perm], h[perm][:, perm], scale[:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1, dtype=w.dtype)
        hb = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            s = scale[:, i1 + i]
            qi = torch.clamp(torch.round(w1[:, i] / s), qmin, qmax) * s
            q[:, i1 + i] = qi
            e = (w1[:, i] - qi) / hb[i, i]
            w1[:, i:] -= e.reshape(-1, 1) * hb[i, i:].reshape(1, -1)
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return q[:, torch.argsort(perm)]


def proxy_error(w, q, h) -> float:
    d = (w.double() - q.double())
    return float(torch.einsum("nk,kl,nl->", d, h, d))


def _row_errors(w, q, h) -> torch.Tensor:
    d = w.double() - q.double()
    return ((d @ h.double()) * d).sum(1)


def refit_scales(w, q, h, scale, group: int):
    """For the integer codes c = q / scale fixed, each row's group scales s minimizing the
    proxy error (w - A s)^T H (w - A s), A = [c restricted to each group] (least squares,
    groups coupled through H). Rows where the fit does not lower the error, or would give a
    scale <= 0, keep theirs. Returns (scale [N, 1] or [N, G], Q = codes * float32 scale)."""
    w, h = w.double(), h.double()
    n, k = w.shape
    g = group or k
    full = _scales_for_columns(scale, k, group).double()
    c = torch.round(q.double() / full)
    pad, groups = -(-k // g) * g - k, -(-k // g)
    cp = torch.nn.functional.pad(c, (0, pad)).reshape(n, groups, g)
    hp = torch.nn.functional.pad(h, (0, pad, 0, pad)).reshape(groups * g, groups, g)
    p = torch.einsum("kjl,njl->nkj", hp, cp).reshape(n, groups, g, groups)  # sum_{l in g_j} H_kl c_l
    m = torch.einsum("nig,nigj->nij", cp, p)  # A^T H A
    b = torch.einsum("nig,nig->ni", cp, torch.nn.functional.pad(w @ h, (0, pad)).reshape(n, groups, g))  # A^T H w
    ridge = 1e-9 * torch.diagonal(m, dim1=1, dim2=2).abs().amax(-1).clamp_min(1e-30)
    m = m + ridge.reshape(n, 1, 1) * torch.eye(groups, dtype=m.dtype)
    fit = torch.linalg.solve(m, b.unsqueeze(-1)).squeeze(-1).float()
    old = scale.reshape(n, -1).float()
    fit = torch.where(cp.abs().sum(-1) > 0, fit, old)  # groups of all-zero codes keep theirs
    new_q = c * _scales_for_columns(fit.reshape(scale.shape), k, group).double()
    ok = (fit > 0).all(1) & torch.isfinite(fit).all(1) & (_row_errors(w, new_q, h) < _row_errors(w, q, h))
    best = torch.where(ok.reshape(-1, 1), fit, old).reshape(scale.shape)
    return best, c * _scales_for_columns(best, k, group).double()


@register("gptq")
class GPTQ(Pass):
    """GPTQ: round every quantized linear's weight with its input Hessian from calibration
    data (after fake-quant; act_order, damping, lazy blocks)."""

    group: int = -1
    act_order: bool = True
    damp: float = 0.01
    block: int = 128
    batches: int = 0
    clip: bool = False
    clip_min: float = 0.5
    sequential: bool = False
    float_target: bool = False
    search: int = 0
    refit: int = 0

    def __post_init__(self):
        if self.damp < 0 or self.block <= 0 or self.group < -1:
            raise QuantSpecError(f"{self}: damp must be >= 0, block > 0, group -1 (as quantized), 0 or a size")
        if self.search < 0 or self.search == 1 or self.refit < 0:
            raise QuantSpecError(f"{self}: search must be 0 (off) or >= 2 scale factors tried, refit >= 0 "
                                 "(rounds of scale refitting)")
        if self.float_target and not self.sequential:
            raise QuantSpecError(f"{self}: float_target needs sequential=true (the quantized inputs of each layer)")
        if not 0 < self.clip_min <= 1:
            raise QuantSpecError(f"{self}: clip_min must be in (0, 1] (the smallest fraction of max-abs tried)")

    def _sequential(self, gm, ctx, layers) -> dict:
        """Layer by layer in graph order: each layer's Hessian comes from the inputs it sees
        once the layers before it are rounded (and activation quantizers applied); with
        float_target, also from the float model's inputs (the cross moment X~^T X)."""
        errors, by_input = {}, {}

        def hook(lin):
            def before(envs, float_envs=()):
                x = lin.args[0]
                if x not in by_input:
                    h, cross = Hessian(), Hessian()
                    for i, env in enumerate(envs):
                        h(env[x])
                        if float_envs:
                            xq, xf = (e[x].detach().reshape(-1, e[x].shape[-1]).double() for e in (env, float_envs[i]))
                            cross.sum = xq.T @ xf + (0 if cross.sum is None else cross.sum)
                            cross.count += xq.shape[0]
                    by_input[x] = (h.value(), cross.value() if float_envs else None)
                q, *errors[lin.name] = self._round(gm, lin, *by_input[x])
                for env in envs:
                    env[lin.args[1]] = q.float()
            return before

        run_lockstep(gm, ctx, {lin: hook(lin) for lin in layers}, str(self), self.batches, self.float_target)
        return errors

    def _round(self, gm, lin, h, cross=None):
        """Round `lin`'s weight with Hessian h; returns (Q, its proxy error, RTN's). With the
        cross moment X~^T X of quantized and float inputs, the weight rounded is the least-
        squares fit W X^T X~ (H + damp)^-1 of the float outputs from the quantized inputs
        (||X~ Q^T - X W^T||^2 = tr((Q - W') H (Q - W')^T) + const), and errors are to it."""
        fq = lin.args[1]
        w_node, s_node, z_node, qmin, qmax, group = fq.args
        w = get_attr_tensor(gm, w_node).detach()
        if cross is not None:
            hd = h + self.damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
            w = torch.linalg.solve(hd, cross @ w.double().T).T.float()  # (H+d)^-1 symmetric
        scale = get_attr_tensor(gm, s_node)
        if self.group >= 0 and self.group != group:
            from .fake_quant import weight_scale

            group = self.group if self.group < w.shape[1] else 0
            scale = weight_scale(w, fq.meta["qc"]["bits"], group)
            fq.update_arg(1, add_constant(gm, f"{lin.name}_gptq_scale", scale, fq))
            fq.update_arg(2, add_constant(gm, f"{lin.name}_gptq_zp", torch.zeros_like(scale), fq))
            fq.update_arg(5, group)
            fq.meta["qc"]["group_size"] = group
            lin.meta["qc"].update(group_size=group, granularity="group" if group else "channel")
        full = _scales_for_columns(scale, w.shape[1], group)
        rtn = torch.clamp(torch.round(w.double() / full.double()), qmin, qmax) * full.double()
        if self.clip:
            scale = clipped_scale(w, torch.diagonal(h), scale, group, qmin, qmax, self.clip_min)
        best = (float("inf"), None, None)
        for f in [1.0] + [float(f) for f in torch.linspace(1.1, 0.8, self.search) if abs(f - 1) > 1e-6]:
            sc = scale * f
            for i in range(max(self.refit, 1)):
                q = gptq_quantize(w, h, _scales_for_columns(sc, w.shape[1], group), qmin, qmax,
                                  self.damp, self.act_order, self.block)
                if self.refit:
                    sc, q = refit_scales(w, q, h, sc, group)
                err = proxy_error(w, q, h)
                best = min(best, (err, q, sc), key=lambda b: b[0])
        err, q, scale = best
        if self.clip or self.search or self.refit:
            fq.update_arg(1, add_constant(gm, f"{lin.name}_clip_scale", scale, fq))
        fq.meta["qc"].setdefault("float_weight", fq.args[0].target)  # kept for QAT's float teacher
        fq.update_arg(0, add_constant(gm, f"{lin.name}_gptq_weight", q.float(), fq))
        return q, err, proxy_error(w, rtn, h)

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        layers = [n for n in gm.graph.nodes if op_name(n) == "aten.linear" and n.meta.get("qc", {}).get("quantized")
                  and op_name(n.args[1]) == "qc.fake_quant" and n.args[1].args[0].op == "get_attr"]
        if not layers:
            raise QuantSpecError("gptq found no quantized linear layer: run fake-quant before gptq")
        if self.sequential:
            errors = self._sequential(gm, ctx, layers)
        else:
            hess = {}
            for lin in layers:
                hess.setdefault(lin.args[0], Hessian())
            watch(gm, ctx, dict(hess), str(self), self.batches)
            errors = {}
            for lin in layers:
                errors[lin.name] = self._round(gm, lin, hess[lin.args[0]].value())[1:]
        cleanup(gm)
        ratio = sum(e[0] for e in errors.values()) / max(sum(e[1] for e in errors.values()), 1e-30)
        return PassResult(True, f"{len(layers)} layers, output error {ratio:.3f} x round-to-nearest's",
                          {"errors": errors, "ratio": ratio})
