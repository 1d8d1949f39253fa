"""`smooth`: SmoothQuant (Xiao et al. 2023): move activation outliers into the weights.

For a linear y = x W^T whose input has a few channels of large magnitude, per input
channel c

    s_c = max|x_c|^alpha / max|W[:, c]|^(1 - alpha),     x' = x / s,  W' = W diag(s),

keeps x' W'^T = x W^T while flattening x's channel ranges (alpha = 0.5 splits the
difficulty evenly). Linears that read the same tensor share one s (the max of their weight
columns). The division is folded into what produces x, so no op is added:
- a norm weight (RMSNorm's x * gamma, or LayerNorm's gamma and beta) -> gamma / s, beta / s;
- an elementwise product a * b (e.g. silu(gate) * up) where b is a linear read only there
  -> that linear's output rows (and bias) / s;
- a linear read only by the smoothed layers -> its rows / s.
Every reader of x must be smoothed with the same s, else x cannot change and the layer is
left as is (listed in the result with the reason). max|x_c| comes from calibration data;
the float function is checked against the input IR afterwards.
"""

from __future__ import annotations

import torch
import torch.fx

from qcompiler.ir import add_constant, cleanup, copy_ir, get_attr_tensor, op_name
from qcompiler.pass_manager import Pass, PassResult, register

from .rotation_graph import _IGNORED
from .stats import check_equivalent, reference_args, watch


class AbsMax:
    """Per-channel max |x| over the rows of every value it sees (last dim = channels)."""

    def __init__(self):
        self.value = None

    def __call__(self, x):
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).double()
        self.value = m if self.value is None else torch.maximum(self.value, m)


def _const(n) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "get_attr"


def _readers(x):
    return [u for u in x.users if op_name(u) not in _IGNORED]


def _only_read_by(x, group) -> bool:
    return all(u in group for u in _readers(x))


def absorber(x, group) -> tuple[str, torch.fx.Node] | str:
    """How the producer of x can absorb a per-channel 1/s: (kind, node), or why not."""
    if not _only_read_by(x, group):
        others = [u.name for u in _readers(x) if u not in group]
        return f"{x.name} is also read by {', '.join(others[:3])}"
    name = op_name(x)
    if name == "aten.mul.Tensor" and any(_const(a) for a in x.args[:2]):
        g = x.args[0] if _const(x.args[0]) else x.args[1]
        v = g.meta.get("val")
        if v is not None and v.dim() == 1:
            return "gamma", x
    if name == "aten.layer_norm" and len(x.args) > 2 and _const(x.args[2]):
        return "layer_norm", x
    if name == "aten.linear" and _const(x.args[1]):
        return "linear", x
    if name == "aten.mul.Tensor":
        for a in x.args[:2]:
            if isinstance(a, torch.fx.Node) and op_name(a) == "aten.linear" and _const(a.args[1]) and _readers(a) == [x]:
                return "linear", a
    return f"{x.name} ({name}) cannot absorb a per-channel scale"


def apply_scale(gm, kind: str, node, inv_s: torch.Tensor, w) -> None:
    """Divide the channels that `node` produces by s (inv_s = 1/s), into new constants (the
    IR's constants may alias the user's model: they are never changed in place)."""
    if kind == "gamma":
        pos = 0 if _const(node.args[0]) else 1
        _replace_const(gm, node, pos, inv_s)
    elif kind == "layer_norm":
        for pos in (2, 3):
            if len(node.args) > pos and node.args[pos] is not None:
                _replace_const(gm, node, pos, inv_s)
    else:
        w.set(node, "weight", w.get(node) * inv_s.reshape(-1, 1))
        b = w.get(node, "bias")
        if b is not None:
            w.set(node, "bias", b * inv_s)


def _replace_const(gm, node, pos: int, factor: torch.Tensor) -> None:
    t = get_attr_tensor(gm, node.args[pos])
    c = add_constant(gm, f"{node.name}_smooth_{pos}", (t.detach().double() * factor).to(t.dtype), node)
    node.update_arg(pos, c)


def smooth_inputs(gm, ctx, targets, alpha: float, batches: int, what: str) -> list[str]:
    """Smooth the inputs of the `targets` linears where their producer can absorb the scale;
    returns the names of the smoothed linears (weights written back)."""
    from .rotate import Weights

    groups: dict = {}
    for lin in targets:
        if _const(lin.args[1]):
            groups.setdefault(lin.args[0], []).append(lin)
    plans = {}
    for x, lins in groups.items():
        group = [u for u in _readers(x) if op_name(u) == "aten.linear" and u.args[0] is x and _const(u.args[1])]
        how = absorber(x, group)
        if not isinstance(how, str):
            plans[x] = (group, how)
    if not plans:
        return []
    stats = {x: AbsMax() for x in plans}
    watch(gm, ctx, dict(stats), what, batches)
    w, done = Weights(gm), []
    for x, (group, (kind, node)) in plans.items():
        wmax = torch.stack([w.get(u).abs().amax(0) for u in group]).amax(0)
        s = (stats[x].value.clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha)).clamp(1e-4, 1e4)
        apply_scale(gm, kind, node, 1.0 / s, w)
        for u in group:
            w.set(u, "weight", w.get(u) * s.reshape(1, -1))
            done.append(u.name)
    w.commit("smooth")
    cleanup(gm)
    return done


@register("smooth")
class Smooth(Pass):
    """SmoothQuant: per-channel scales move activation outliers into the weights, folded into
    the preceding norm or linear; `layers` (globs of module paths / node names) restricts
    which linears are smoothed."""

    alpha: float = 0.5
    layers: tuple[str, ...] = ()
    batches: int = 0
    tol: float = 1e-3

    def __post_init__(self):
        from qcompiler.errors import QuantSpecError

        if not 0.0 <= self.alpha <= 1.0:
            raise QuantSpecError(f"smooth: alpha={self.alpha} must be in [0, 1] (0.5 balances activations and weights)")

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        from .rotate import matches

        before = copy_ir(gm)
        targets = [n for n in gm.graph.nodes if op_name(n) == "aten.linear"
                   and not n.meta.get("qc", {}).get("quantized") and (not self.layers or matches(n, self.layers))]
        done = smooth_inputs(gm, ctx, targets, self.alpha, self.batches, str(self))
        skipped = {}
        for lin in targets:
            if lin.name not in done:
                how = absorber(lin.args[0], [lin])
                skipped[lin.name] = how if isinstance(how, str) else "its input is shared with layers not smoothed"
        err = check_equivalent(before, gm, reference_args(gm, ctx), self.tol, str(self))
        return PassResult(bool(done), f"smoothed {len(done)} linears, {len(skipped)} left as they are",
                          {"smoothed": done, "skipped": skipped, "max_rel_error": err})
