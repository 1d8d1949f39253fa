"""`rotate`: orthogonal rotations that make activations and weights easier to quantize
(QuaRot, Ashkboos et al. 2024; SpinQuant; MambaQuant, Xu et al. 2025 for the KLT variants).

For an orthogonal Q, linear(x, W) = linear(x Q, W Q): rotating what a layer reads and its
weight's input columns together keeps the function, and a rotation spreads outlier channels
over all channels, which is what low-bit quantizers need. Which rotations:

- `residual` (R1): the residual stream of a pre-norm transformer is rotated once, folded
  into every weight: producers (embedding E Q, layers writing into the stream Q^T W),
  readers (W Q). RMSNorm commutes with Q once its weight is folded into the linears it
  feeds (||x Q|| = ||x||); LayerNorm is first turned into RMSNorm by centering every
  producer (the stream is then zero-mean, so LN(x) = x / rms(x)), its weight and bias folded
  into the readers. `rotation_graph` proves each step or refuses with the node and reason.
- `heads` (R2): per attention head, values and the output projection's input, folded into
  v_proj's rows and o_proj's columns (a block-diagonal Hadamard of the head size).
- `online`: linears whose module path or node name matches one of these globs (e.g.
  `*.down_proj`) read x R through a new `qc.hadamard` op and hold W R. With
  `variance_aligned`, channel scales s first equalize the input's channels where a producer
  can absorb them (MambaQuant's smooth-fused rotation; `smooth.absorb`). With `online_signs`
  the online rotation is QuaRot's randomized Hadamard R = D H (D a fixed diagonal of random
  +-1, seeded): x is multiplied by D (an exact sign flip, `aten.mul` by a constant) before
  `qc.hadamard`, and W holds W D H. A plain Sylvester/Paley H maps structured inputs (e.g.
  GELU outputs, whose channels share a positive mean) onto a few large coordinates; the
  signs decorrelate the input from H's rows (MiniLM's FFN-down inputs: 4-bit SQNR from
  12-15 dB to ~17 dB, like the other layers' inputs).
- `keys` (R3): queries and keys both pass through `qc.hadamard` of the head size before
  q k^T, which does not change the scores; keys are then easier to quantize (KV cache).

`kind` chooses the residual rotation (`klt`: the covariance of the stream's normalized
values over calibration data; `klt-hadamard`: KLT then Hadamard). Head, key and online
rotations are always Hadamard (online ones must have a fast transform). After rewriting, the
float graph is run against a copy of the input IR; outputs must agree within `tol`.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

import torch
import torch.fx

from qcompiler.errors import QuantSpecError, TransformError
from qcompiler.hadamard import hadamard_matrix
from qcompiler.ir import add_constant, cleanup, copy_ir, get_attr_tensor, op_name
from qcompiler.pass_manager import Pass, PassResult, register

from . import klt
from .attention import find_attention
from .rotation_graph import _IGNORED, _LAYOUT, _SAFE, refuse, stream
from .stats import check_equivalent, reference_args, watch


def module_path(node: torch.fx.Node) -> str:
    """The dotted path of the module that produced a node (its name when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else node.name


def matches(node: torch.fx.Node, globs) -> bool:
    return any(fnmatch.fnmatch(module_path(node), g) or fnmatch.fnmatch(node.name, g) for g in globs)


class Weights:
    """New values of layer weights and biases (float64), written back as new constants."""

    def __init__(self, gm):
        self.gm, self.vals = gm, {}

    @staticmethod
    def _pos(node) -> int:
        return 0 if op_name(node) == "aten.embedding" else 1

    def get(self, node, what: str = "weight"):
        key = (node, what)
        if key not in self.vals:
            if what == "weight":
                arg = node.args[self._pos(node)]
            else:
                arg = node.args[2] if len(node.args) > 2 else None
            self.vals[key] = None if arg is None else get_attr_tensor(self.gm, arg).detach().double()
        return self.vals[key]

    def set(self, node, what: str, value) -> None:
        self.vals[(node, what)] = value

    def commit(self, tag: str) -> None:
        for (node, what), v in self.vals.items():
            if v is None:
                continue
            c = add_constant(self.gm, f"{node.name}_{tag}_{what}", v.detach().float().contiguous(), node)
            args, pos = list(node.args), self._pos(node) if what == "weight" else 2
            args += [None] * (pos + 1 - len(args))
            args[pos] = c
            node.args = tuple(args)
        self.vals.clear()
        cleanup(self.gm)


def insert_hadamard(gm, x: torch.fx.Node, size: int, before: torch.fx.Node) -> torch.fx.Node:
    with gm.graph.inserting_before(before):
        h = gm.graph.call_function(torch.ops.qc.hadamard.default, (x, size))
    if "val" in x.meta:
        h.meta["val"] = x.meta["val"]
    h.meta["qc"] = {"rotation": "online", "size": size}
    return h


def _flip_signs(gm, x: torch.fx.Node, d: torch.Tensor, before: torch.fx.Node) -> torch.fx.Node:
    """x * d for a constant +-1 vector d (exact in float): the D of a randomized Hadamard."""
    c = add_constant(gm, f"{x.name}_signs", d.float(), before)
    with gm.graph.inserting_before(before):
        m = gm.graph.call_function(torch.ops.aten.mul.Tensor, (x, c))
    if "val" in x.meta:
        m.meta["val"] = x.meta["val"]
    return m


def _norm_readers(g, s):
    """(chain, sinks, others): the ops that pass a norm's output on unchanged (to, slice, ...),
    the linears reading it through them, and any other reader (which blocks the fold)."""
    chain, sinks, others = [g], [], []
    for x in chain:
        for u in x.users:
            if op_name(u) in _IGNORED:
                continue
            if u in s.sinks and u.args[0] is x:
                sinks.append(u)
            elif (op_name(u) in _SAFE or op_name(u) in _LAYOUT) and u in s.nodes:
                chain.append(u)
            else:
                others.append(u)
    return chain, sinks, others


def _stream_operand(g):
    return g.args[1] if g.args[0].op == "get_attr" else g.args[0]


@register("rotate")
class Rotate(Pass):
    """Orthogonal rotations before quantization (QuaRot/MambaQuant): the residual stream
    folded through norms, per-head values, keys and online Hadamards on chosen linears."""

    kind: Literal["hadamard", "random", "klt", "klt-hadamard"] = "hadamard"
    residual: bool = True
    heads: bool = False
    keys: bool = False
    online: tuple[str, ...] = ()
    variance_aligned: bool = False
    online_signs: bool = False
    alpha: float = 0.5
    seed: int = 0
    batches: int = 0
    tol: float = 1e-3

    def __post_init__(self):
        if self.online_signs and not self.online:
            raise QuantSpecError("rotate(online_signs=true) randomizes the online rotations: give the linears "
                                 "to rotate online with it, e.g. online=*.down_proj")

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        before, w, changed, details = copy_ir(gm), Weights(gm), set(), {}
        if self.residual:
            changed |= self._residual(gm, ctx, w, details)
        if self.heads:
            changed |= self._heads(gm, w, details)
        w.commit("rot")
        if self.online:
            changed |= self._online(gm, ctx, w, details)
        if self.keys:
            changed |= self._keys(gm, details)
        gm.recompile()
        details["max_rel_error"] = check_equivalent(before, gm, reference_args(gm, ctx), self.tol, str(self), changed)
        return PassResult(bool(changed), ", ".join(f"{k}: {v}" for k, v in details.items() if k != "max_rel_error"), details)

    # -- R1: the residual stream, folded through the norms
    def _residual(self, gm, ctx, w: Weights, details) -> set:
        seeds = [n.args[0] for n in gm.graph.nodes if op_name(n) == "aten.layer_norm"]
        seeds += [n.args[0] for n in gm.graph.nodes if op_name(n) == "aten.pow.Tensor_Scalar" and n.args[1] == 2
                  and any(op_name(u) == "aten.mean.dim" for u in n.users)]
        if not seeds:
            raise TransformError(
                "rotate(residual=true) found no RMSNorm or LayerNorm: the residual rotation is folded "
                "through norms and this graph has none; use residual=false with online=<linear globs> "
                "to rotate layer inputs online instead")
        dim = int(seeds[0].meta["val"].shape[-1])
        s = stream(gm, list(dict.fromkeys(seeds)), dim, norms=True)
        readers = {}
        for g in s.norm_weights + s.layer_norms:
            chain, sinks, others = _norm_readers(g, s)
            if others:
                raise refuse(g, f"the norm's output also feeds {others[0].name} ({op_name(others[0])}), not only "
                                "linear layers (a post-norm block?): its weight cannot be folded")
            readers[g] = (chain, sinks)
        if s.layer_norms:
            normed = {c for ln in s.layer_norms for c in readers[ln][0]}
            raw = [u for u in s.sinks if u.args[0] not in normed]
            if raw:
                raise refuse(raw[0], "reads the residual stream without a LayerNorm; centering the stream "
                                     "(needed to turn LayerNorm into RMSNorm) would change what it reads")
        cov = self._covariance(gm, ctx, s, dim) if self.kind.startswith("klt") else None
        q = klt.rotation(self.kind, dim, self.seed, cov, where=f"rotate(kind={self.kind})")
        for g in s.norm_weights:  # x * gamma read by W  ==  x read by W diag(gamma)
            gamma = get_attr_tensor(gm, g.args[0] if g.args[0].op == "get_attr" else g.args[1]).detach().double()
            for u in readers[g][1]:
                w.set(u, "weight", w.get(u) * gamma.reshape(1, -1))
            g.replace_all_uses_with(_stream_operand(g))
            gm.graph.erase_node(g)
        for ln in s.layer_norms:
            self._layer_norm_to_rms(gm, ln, readers[ln][1], w)
        if s.layer_norms:  # a zero-mean stream: every producer writes centered rows
            for p in s.producers:
                if op_name(p) == "aten.embedding":
                    e = w.get(p)
                    w.set(p, "weight", e - e.mean(1, keepdim=True))
                else:
                    wt, b = w.get(p), w.get(p, "bias")
                    w.set(p, "weight", wt - wt.mean(0, keepdim=True))
                    if b is not None:
                        w.set(p, "bias", b - b.mean())
        self._rotate(s, w, lambda n: q)
        details["residual"] = (f"{self.kind} {dim}: {len(s.producers)} producers, {len(s.sinks)} readers, "
                               f"{len(s.norm_weights) + len(s.layer_norms)} norms folded")
        return {n.name for n in s.nodes}

    def _covariance(self, gm, ctx, s, dim) -> torch.Tensor:
        cov, fns = klt.Covariance(dim), {}
        for u in s.sinks:
            x = u.args[0]
            while x not in s.layer_norms and x not in s.norm_weights and op_name(x) in _SAFE | _LAYOUT:
                x = x.args[0]  # e.g. the final norm's output sliced before lm_head
            if x in s.layer_norms:
                shape, eps = x.args[1], (x.args[4] if len(x.args) > 4 else 1e-5)
                fns[x.args[0]] = lambda v, shape=shape, eps=eps: cov(torch.nn.functional.layer_norm(v, shape, eps=eps))
            else:
                fns[_stream_operand(x) if x in s.norm_weights else x] = cov
        watch(gm, ctx, fns, f"rotate(kind={self.kind})", self.batches)
        return cov.value()

    def _layer_norm_to_rms(self, gm, ln, sinks, w: Weights) -> None:
        x, shape = ln.args[0], ln.args[1]
        gamma = ln.args[2] if len(ln.args) > 2 else None
        beta = ln.args[3] if len(ln.args) > 3 else None
        eps = ln.args[4] if len(ln.args) > 4 else 1e-5
        if len(shape) != 1:
            raise refuse(ln, f"normalizes over {len(shape)} dims; only the last dim can be rotated")
        g = get_attr_tensor(gm, gamma).detach().double() if gamma is not None else None
        b = get_attr_tensor(gm, beta).detach().double() if beta is not None else None
        for u in sinks:
            wt, bias = w.get(u), w.get(u, "bias")
            if b is not None:
                bias = (bias if bias is not None else 0) + wt @ b
            w.set(u, "weight", wt * g.reshape(1, -1) if g is not None else wt)
            w.set(u, "bias", bias)
        A = torch.ops.aten
        with gm.graph.inserting_before(ln):
            p = gm.graph.call_function(A.pow.Tensor_Scalar, (x, 2))
            m = gm.graph.call_function(A.mean.dim, (p, [-1], True))
            r = gm.graph.call_function(A.rsqrt.default, (gm.graph.call_function(A.add.Tensor, (m, eps)),))
            n = gm.graph.call_function(A.mul.Tensor, (x, r))
        n.meta["val"] = ln.meta.get("val")
        ln.replace_all_uses_with(n)
        gm.graph.erase_node(ln)

    def _rotate(self, s, w: Weights, qfor) -> None:
        for p in s.producers:
            if op_name(p) == "aten.embedding":
                e = w.get(p)
                w.set(p, "weight", e @ qfor(e.shape[1]))
            else:
                wt, b = w.get(p), w.get(p, "bias")
                q = qfor(wt.shape[0])
                w.set(p, "weight", q.T @ wt)
                if b is not None:
                    w.set(p, "bias", b @ q)
        for u in s.sinks:
            wt = w.get(u)
            w.set(u, "weight", wt @ qfor(wt.shape[1]))

    # -- R2: per head, values and the output projection
    def _heads(self, gm, w: Weights, details) -> set:
        atts = find_attention(gm)
        if not atts:
            raise TransformError("rotate(heads=true) found no attention (matmul(q, k^T) -> softmax -> matmul(p, v))")
        hd = int(atts[0].v.meta["val"].shape[-1])
        kind = self.kind if self.kind in ("hadamard", "random") else "hadamard"
        q = klt.rotation(kind, hd, self.seed + 1, where="rotate(heads=true)")
        s = stream(gm, [a.v for a in atts], hd, norms=False)
        self._rotate(s, w, lambda n: torch.block_diag(*[q] * (n // hd)))
        details["heads"] = f"{kind} {hd}: {len(s.producers)} value projections, {len(s.sinks)} output projections"
        return {n.name for n in s.nodes}

    # -- online Hadamards on chosen linears' inputs
    def _online(self, gm, ctx, w: Weights, details) -> set:
        targets = [n for n in gm.graph.nodes if op_name(n) == "aten.linear" and matches(n, self.online)]
        if not targets:
            raise TransformError(f"rotate(online={';'.join(self.online)}): no linear layer matches these patterns")
        smoothed = []
        if self.variance_aligned:
            from .smooth import smooth_inputs

            smoothed = smooth_inputs(gm, ctx, targets, self.alpha, self.batches, f"{self}")
        done: dict = {}
        for lin in targets:
            if lin.args[1].op != "get_attr":
                raise refuse(lin, "its weight is computed at run time; an online rotation needs a constant weight")
            x, n = lin.args[0], int(get_attr_tensor(gm, lin.args[1]).shape[1])
            klt.need_hadamard(n, f"rotate(online): linear {lin.name} ({module_path(lin)})")
            d = klt.random_signs(n, self.seed + 2) if self.online_signs else None
            if x not in done:
                done[x] = insert_hadamard(gm, x if d is None else _flip_signs(gm, x, d, lin), n, lin)
            lin.update_arg(0, done[x])
            wt = w.get(lin) if d is None else w.get(lin) * d.reshape(1, -1)
            w.set(lin, "weight", wt @ hadamard_matrix(n))
        w.commit("online")
        details["online"] = f"{len(targets)} linears" + (f", {len(smoothed)} smoothed first" if smoothed else "")
        return {n.name for n in done} | set(smoothed)

    # -- R3: queries and keys
    def _keys(self, gm, details) -> set:
        atts = find_attention(gm)
        if not atts:
            raise TransformError("rotate(keys=true) found no attention (matmul(q, k^T) -> softmax -> matmul(p, v))")
        for a in atts:
            hd = int(a.q.meta["val"].shape[-1])
            klt.need_hadamard(hd, f"rotate(keys=true) at {a.scores.name}")
            a.scores.update_arg(0, insert_hadamard(gm, a.q, hd, a.scores))
            a.k_t.update_arg(0, insert_hadamard(gm, a.k, hd, a.k_t))
        details["keys"] = f"{len(atts)} attention blocks"
        return set()
