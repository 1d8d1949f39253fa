"""`calibrate`: set the range of every activation quantizer from calibration batches.

The float graph runs on `PassContext.calib` with activation fake-quants bypassed, and an
observer watches what enters each one:

- `minmax`: the extremes seen.
- `percentile`: the `percentile`-th and (100 - `percentile`)-th percentiles of the values.
- `mse`: the clipping range [alpha*lo, alpha*hi], alpha in (0, 1], that minimizes the
  mean squared error of fake quantization on the values seen (grid search, 100 steps).
- `kl`: entropy calibration (TensorRT's, Migacz 2017): a 2048-bin histogram of |x|; for each
  candidate threshold t, the clipped histogram P (outliers added to its last bin) and its
  quantization Q onto the grid's levels (each level spreading its mass over its non-empty
  bins); t minimizes KL(P || Q), and the range is [max(lo, -t), min(hi, t)]. Exact zeros
  are left out of the histogram: 0.0 is on every grid, so they cost nothing, while a spike
  of them in the first bin (ReLU/ReLU6 outputs) would make every merge of that bin look
  expensive and pull t down to `levels` bins.

Percentile, mse and kl read a uniform sample of at most `sample` values per quantizer.

With `token_clip`, the same batches also choose, per per-token run-time quantizer
(`fake-quant(a_granularity=token)`), the clip ratio c of its range (symmetric:
s = max|x| / (qmax / c); asymmetric: [lo, hi] = c * [min(min x, 0), max(max x, 0)];
`dynamic_quant`) from 1, 0.95, ..., `token_clip_min`: the c with the least output-weighted
squared rounding error summed over every calibration row,

    err(c) = sum_rows sum_k (Q_c(x)_k - x_k)^2 * sum_consumers ||W[:, k]||^2

(W the float weight of each linear reading the quantizer; weight 1 if none), i.e. the
error of the consumers' outputs with their inputs' errors taken as uncorrelated. Rows are
seen as they arrive with the earlier quantizers on. Rows with per-row levels (`token-bits`)
keep their ranges. With `token_clip_kv` the KV cache's quantizers (keys per channel over
the window, values per token) are searched the same way, replacing `fake-quant`'s fixed
`kv_clip`, with the plain squared error (weight 1: their consumers are the attention
products, not weights).
Asymmetric: s = (hi - lo) / (qmax - qmin), z = qmin - round(lo / s), with lo <= 0 <= hi so
that 0.0 is exact. Symmetric: s = max(|lo|, |hi|) / qmax, z = 0.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.fx
from tqdm.auto import tqdm

from qcompiler.errors import CalibrationError
from qcompiler.ir import as_tuple, example_inputs, get_attr_tensor, op_name
from qcompiler.pass_manager import Pass, PassResult, register

from .convert import fit_bias_scales


class Observer:
    def __init__(self, sample: int, generator: torch.Generator):
        self.lo, self.hi = float("inf"), float("-inf")
        self.samples: list[torch.Tensor] = []
        self.sample, self.gen = sample, generator

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        if x.numel() == 0:
            return
        self.lo, self.hi = min(self.lo, x.min().item()), max(self.hi, x.max().item())
        if x.numel() > self.sample:
            x = x[torch.randint(0, x.numel(), (self.sample,), generator=self.gen)]
        self.samples.append(x)

    def values(self) -> torch.Tensor:
        v = torch.cat(self.samples)
        if v.numel() > self.sample:
            v = v[torch.randint(0, v.numel(), (self.sample,), generator=self.gen)]
        return v


def qparams(lo: float, hi: float, qmin: int, qmax: int, symmetric: bool) -> tuple[float, float]:
    """Scale and zero point for the range [lo, hi] (extended to hold 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        scale = max(-lo, hi) / qmax
        return max(scale, 1e-8), 0.0
    scale = max((hi - lo) / (qmax - qmin), 1e-8)
    zp = qmin - round(lo / scale)
    return scale, float(min(max(zp, qmin), qmax))


def _fq_error(v, lo, hi, qmin, qmax, symmetric) -> float:
    s, z = qparams(lo, hi, qmin, qmax, symmetric)
    q = torch.clamp(torch.round(v / s) + z, qmin, qmax)
    return float(((q - z) * s - v).pow(2).mean())


@register("calibrate")
class Calibrate(Pass):
    """Run calibration batches through the graph and set every activation quantizer's range
    with an observer (minmax, percentile, mse, kl)."""

    observer: Literal["minmax", "percentile", "mse", "kl"] = "minmax"
    percentile: float = 99.99
    batches: int = 0
    sample: int = 65536
    seed: int = 0
    token_clip: bool = False
    token_clip_min: float = 0.5
    token_clip_kv: bool = False

    def __post_init__(self):
        if self.token_clip_kv and not self.token_clip:
            raise CalibrationError("token_clip_kv=true searches the KV cache's clip ratios as part of the "
                                   "clip search: give it with token_clip=true")
        if not 0 < self.token_clip_min <= 1:
            raise CalibrationError(f"token_clip_min={self.token_clip_min}: the smallest clip ratio tried must be "
                                   "in (0, 1], e.g. 0.5")

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        fqs = [n for n in gm.graph.nodes  # quantizers imported with their scales (QDQ ONNX) are kept
               if n.op == "call_function" and op_name(n) == "qc.fake_quant"
               and n.meta.get("qc", {}).get("role") == "act" and not n.meta["qc"].get("imported")]
        searches = {n: ClipSearch(gm, n, self.token_clip_min) for n in gm.graph.nodes
                    if self.token_clip and ClipSearch.applies(n, self.token_clip_kv)}
        if not fqs and not searches:
            return PassResult(False, "no activation quantizers to calibrate")
        if ctx.calib is None:
            raise CalibrationError(
                "calibrate needs calibration batches: pass calib=[batch, ...] to qcompiler.compile "
                "or PassContext(calib=...); each batch is a tensor or tuple shaped like example_inputs"
            )
        gen = torch.Generator().manual_seed(self.seed)
        observers = {n: Observer(self.sample, gen) for n in fqs}
        interp = _Observing(gm, observers, searches)
        count = 0
        for batch in tqdm(ctx.calib, desc="calibrate", unit="batch", leave=False, disable=None):
            args = check_batch(batch, example_inputs(gm), count, gm.meta["qc"].get("dynamic_batch", True))
            with torch.no_grad():
                interp.run(*args)
            count += 1
            if self.batches and count >= self.batches:
                break
        if count == 0:
            raise CalibrationError("the calibration data is empty: give at least one batch")
        for n, obs in observers.items():
            self._set(gm, n, obs)
        clips = {n.name: search.apply() for n, search in searches.items()}
        if clips:
            gm.recompile()
        fitted = fit_bias_scales(gm)  # input scales known: make every int32 bias fit (see convert)
        details = {**({"bias_fit": fitted} if fitted else {}), **({"token_clip": clips} if clips else {})}
        msg = f"calibrated {len(fqs)} quantizers on {count} batches ({self.observer})"
        if clips:
            msg += f"; clip ratios of {len(clips)} per-token quantizers: {min(clips.values())}..{max(clips.values())}"
        return PassResult(True, msg, details)

    def _set(self, gm, node, obs: Observer) -> None:
        _, s_node, z_node, qmin, qmax, _ = node.args
        sym = node.meta["qc"]["symmetric"]
        if obs.lo > obs.hi:  # never saw a value (empty tensors)
            obs.lo = obs.hi = 0.0
        lo, hi = obs.lo, obs.hi
        if self.observer == "percentile":
            v = obs.values()
            lo = float(torch.quantile(v, 1 - self.percentile / 100))
            hi = float(torch.quantile(v, self.percentile / 100))
        elif self.observer == "mse":
            v = obs.values()
            alphas = torch.linspace(0.01, 1.0, 100).tolist()
            best = min(alphas, key=lambda a: _fq_error(v, a * lo, a * hi, qmin, qmax, sym))
            lo, hi = best * lo, best * hi
        elif self.observer == "kl":
            t = kl_threshold(obs.values(), (qmax - qmin + 1) // (2 if lo < 0 < hi else 1))
            lo, hi = max(lo, -t), min(hi, t)
        scale, zp = qparams(lo, hi, qmin, qmax, sym)
        get_attr_tensor(gm, s_node).fill_(scale)
        get_attr_tensor(gm, z_node).fill_(zp)
        node.meta["qc"].update(observed=True, range=(round(lo, 6), round(hi, 6)))


def kl_threshold(v: torch.Tensor, levels: int, bins: int = 2048) -> float:
    """The clipping threshold t of |v| that minimizes KL(P || Q) (see the module docstring)."""
    a = v.abs().double()
    a = a[a > 0]  # exact zeros are quantized exactly (see the module docstring)
    amax = float(a.max()) if a.numel() else 0.0
    if amax == 0.0:
        return 0.0
    hist = torch.histc(a, bins=bins, min=0.0, max=amax)
    best, best_t = float("inf"), amax
    for i in range(levels, bins + 1, max(1, (bins - levels) // 128)):
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()
        level = torch.arange(i) * levels // i  # merge the i bins into `levels` levels
        mass = torch.zeros(levels, dtype=hist.dtype).index_add_(0, level, hist[:i])
        used = torch.zeros(levels, dtype=hist.dtype).index_add_(0, level, (hist[:i] > 0).to(hist.dtype))
        q = torch.where(hist[:i] > 0, (mass / used.clamp_min(1))[level], torch.zeros_like(p))
        mask = p > 0
        if bool((q[mask] == 0).any()):
            continue
        pn, qn = p[mask] / p.sum(), q[mask] / q.sum()
        kl = float((pn * torch.log(pn / qn)).sum())
        if kl < best:
            best, best_t = kl, (i / bins) * amax
    return best_t


class ClipSearch:
    """The clip-ratio search of one run-time quantizer (`token_clip`, module docstring):
    per-token rows (symmetric or asymmetric) and, with `token_clip_kv`, the KV cache's."""

    @staticmethod
    def applies(n, kv: bool = False) -> bool:
        m = n.meta.get("qc", {}) if isinstance(n, torch.fx.Node) else {}
        if op_name(n) != "qc.fake_quant" or m.get("role") != "act_dynamic":
            return False
        if not ((m.get("granularity") == "token" and m.get("dims") == [-1])
                or (kv and str(m.get("granularity", "")).startswith("kv-"))):
            return False
        div = n.args[1].args[0]  # s = clamp_min(div(amax | hi - lo, qmax / c | qmax - qmin), 1e-8)
        if not (op_name(div) == "aten.div.Tensor" and isinstance(div.args[1], float)):
            return False  # per-row levels (token-bits): rows stay on their own grid
        return bool(m.get("symmetric")) or op_name(div.args[0]) == "aten.sub.Tensor"

    def __init__(self, gm, fq, lowest: float, steps: float = 0.05):
        self.fq, self.div = fq, fq.args[1].args[0]
        self.qmin, self.qmax = fq.args[3], fq.args[4]
        self.sym, self.dims = bool(fq.meta["qc"].get("symmetric")), fq.meta["qc"]["dims"]
        self.ratios = [round(1.0 - i * steps, 4) for i in range(int(round((1.0 - lowest) / steps)) + 1)]
        self.err = torch.zeros(len(self.ratios), dtype=torch.float64)
        self.weight = None
        for u in fq.users:
            if op_name(u) == "aten.linear" and u.args[0] is fq:
                w = u.args[1]
                w = w.args[0] if op_name(w) == "qc.fake_quant" else w
                if getattr(w, "op", None) == "get_attr":
                    col = get_attr_tensor(gm, w).detach().float().pow(2).sum(0)
                    self.weight = col if self.weight is None else self.weight + col

    def _quantize(self, x: torch.Tensor, c: float) -> torch.Tensor:
        """x through this quantizer with clip ratio c (`dynamic_quant`'s arithmetic)."""
        if self.sym:
            s = (x.abs().amax(self.dims, keepdim=True) / (self.qmax / c)).clamp_min(1e-8)
            z = torch.zeros_like(s)
        else:
            lo = x.amin(self.dims, keepdim=True).clamp_max(0.0) * c
            hi = x.amax(self.dims, keepdim=True).clamp_min(0.0) * c
            s = ((hi - lo) / float(self.qmax - self.qmin)).clamp_min(1e-8)
            z = self.qmin - torch.round(lo / s)
        return torch.ops.qc.fake_quant.default(x, s, z, self.qmin, self.qmax, 0)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        wt = torch.ones(x.shape[-1]) if self.weight is None else self.weight
        for i, c in enumerate(self.ratios):
            self.err[i] += float(((self._quantize(x, c) - x).pow(2) * wt).sum())

    def apply(self) -> float:
        c = self.ratios[int(torch.argmin(self.err))]
        set_clip_ratio(self.fq, c)
        return c


def set_clip_ratio(fq: torch.fx.Node, c: float) -> None:
    """Write clip ratio c into the run-time quantizer fq (one `ClipSearch.applies` to), in the
    constant form `dynamic_quant` builds, and record it as fq's meta "clip"."""
    div = fq.args[1].args[0]
    if fq.meta["qc"].get("symmetric"):
        div.update_arg(1, float(fq.args[4]) / c)
    else:
        _set_asymmetric_clip(fq.graph, div.args[0], c)
    fq.meta["qc"].pop("clip", None)
    if c != 1.0:
        fq.meta["qc"]["clip"] = c


def _set_asymmetric_clip(graph, rng, c: float) -> None:
    """In rng = sub(hi, lo) of an asymmetric run-time quantizer, make hi and lo c times the
    extremes: update the mul(.., c) that `dynamic_quant` inserts for a clip, or insert one
    (read by everything that read the unclipped bound: the range and the zero point)."""
    for bound in rng.args[:2]:
        if op_name(bound) == "aten.mul.Tensor" and isinstance(bound.args[1], float):
            bound.update_arg(1, c)
        elif c != 1.0:
            with graph.inserting_after(bound):
                m = graph.call_function(torch.ops.aten.mul.Tensor, (bound, c))
            if "val" in bound.meta:
                m.meta["val"] = bound.meta["val"]
            bound.replace_all_uses_with(m, delete_user_cb=lambda u: u is not m)


class _Observing(torch.fx.Interpreter):
    """Runs the graph with activation fake-quants bypassed, feeding observers (and the
    inputs of run-time quantizers to their clip searches, the quantizers left on)."""

    def __init__(self, gm, observers, searches=None):
        super().__init__(gm)
        self.observers, self.searches = observers, searches or {}

    def run_node(self, n):
        if n in self.observers:
            x = self.env[n.args[0]]
            self.observers[n].observe(x)
            return x
        if n in self.searches:
            self.searches[n].observe(self.env[n.args[0]])
        return super().run_node(n)


def check_batch(batch, examples: tuple, index: int, dynamic_batch: bool = True) -> tuple:
    """A calibration batch as a tuple; its shapes (batch size aside) and dtypes must match."""
    try:
        args = as_tuple(batch)
    except Exception:
        raise CalibrationError(
            f"calibration batch {index} is a {type(batch).__name__}; give a tensor or a tuple of tensors"
        ) from None
    if len(args) != len(examples):
        raise CalibrationError(
            f"calibration batch {index} has {len(args)} inputs, the model takes {len(examples)}"
        )
    for i, (a, e) in enumerate(zip(args, examples)):
        if not isinstance(a, torch.Tensor):
            raise CalibrationError(f"calibration batch {index}, input {i} is a {type(a).__name__}, not a tensor")
        if a.dtype != e.dtype or a.dim() != e.dim() or tuple(a.shape[1:]) != tuple(e.shape[1:]):
            raise CalibrationError(
                f"calibration batch {index}, input {i} is {a.dtype}{list(a.shape)}; the model was "
                f"traced with {e.dtype}{list(e.shape)} (only the batch size, dim 0, may differ)"
            )
        if not dynamic_batch and a.shape[0] != e.shape[0]:
            raise CalibrationError(
                f"calibration batch {index}, input {i} has batch size {a.shape[0]}, but the model traced "
                f"only with a static batch of {e.shape[0]}: give batches of that size"
            )
    return args
