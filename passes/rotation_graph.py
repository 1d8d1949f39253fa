"""Which tensors a folded rotation touches, and the proof that it keeps the function.

A rotation Q (orthogonal, block-diagonal with blocks of `block` along the last dim) applied
to a set S of tensors keeps the function when every op reading a tensor of S commutes with
x -> x Q or absorbs Q into a constant:

- producers (start S): linear(x, W, b) -> W' = Q^T W, b' = b Q (output rows); embedding
  rows E' = E Q;
- pass-through ops (output joins S): add/sub of two tensors of S, multiplication by a
  scalar or by a per-row factor (last dim 1), to/contiguous/clone/eval dropout, layout ops
  that keep the last dim's blocks (transpose/permute/unsqueeze/expand/slice off the last dim,
  reshape/view whose last dims stay multiples of `block`), matmul(P, x) (contracts x's
  dim -2); with `norms`, a norm weight mul(gamma, x) and layer_norm (folded first);
- invariant readers: pow(x, 2) read only by mean over the last dim (||x Q|| = ||x||, so
  RMSNorm's statistics do not change), when Q spans the whole last dim;
- sinks (end S): linear(x, W) -> W' = W Q (input columns).

`stream(gm, seeds, block, norms)` flood-fills S from seed tensors, forwards through readers
and backwards to producers; any other op touching S raises TransformError naming the node
and why it does not commute. Nothing is changed here: `Stream` lists what to rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from qcompiler.errors import TransformError
from qcompiler.ir import op_name

_SAFE = {"aten.to.dtype", "aten.contiguous", "aten.clone", "aten.alias", "aten.detach", "aten.dropout"}
_LAYOUT = {"aten.transpose.int", "aten.permute", "aten.unsqueeze", "aten.expand", "aten.slice.Tensor",
           "aten.select.int", "aten.squeeze.dim", "aten.view", "aten.reshape"}
_IGNORED = {"aten._assert_tensor_metadata"}


def refuse(node: torch.fx.Node, why: str) -> TransformError:
    e = TransformError(f"cannot prove the rotation keeps the function at node {node.name} "
                       f"({op_name(node) if node.op == 'call_function' else node.op}): {why}")
    e.node = node.name
    return e


@dataclass
class Stream:
    block: int
    nodes: set = field(default_factory=set)
    producers: list = field(default_factory=list)  # linear or embedding nodes writing into S
    sinks: list = field(default_factory=list)  # linear nodes reading S as their input
    norm_weights: list = field(default_factory=list)  # mul(gamma, x) nodes to fold
    layer_norms: list = field(default_factory=list)
    stats: list = field(default_factory=list)  # pow(x, 2) nodes (RMS statistics)


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _last(n) -> int | None:
    v = _val(n)
    return int(v.shape[-1]) if v is not None and v.dim() else None


def _const_weight(n) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "get_attr"


def _is_row_scalar(a) -> bool:
    """A number or a tensor constant along the last dim (size 1 there, or one element)."""
    if not isinstance(a, torch.fx.Node):
        return isinstance(a, (int, float))
    v = _val(a)
    return v is not None and (v.dim() == 0 or v.shape[-1] == 1)


def _norm_weight(n, x) -> bool:
    """mul(gamma, x) with gamma a constant vector as long as x's last dim."""
    if op_name(n) != "aten.mul.Tensor":
        return False
    other = n.args[1] if n.args[0] is x else n.args[0]
    v = _val(other)
    return _const_weight(other) and v is not None and v.dim() == 1 and v.shape[0] == _last(x)


def _dim_arg(n, pos: int, rank: int) -> int:
    d = n.args[pos] if len(n.args) > pos else 0
    return d % rank if rank else d


def _layout_ok(n, x, block: int) -> str | None:
    """Why the layout op `n` (reading x) breaks the last dim's blocks, or None."""
    name, vin, vout = op_name(n), _val(x), _val(n)
    if vin is None or vout is None:
        return "no shape information (run shape propagation first)"
    rin = vin.dim()
    if name in ("aten.view", "aten.reshape"):
        if int(vin.shape[-1]) % block or int(vout.shape[-1]) % block:
            return f"reshape {list(vin.shape)} -> {list(vout.shape)} splits the rotated blocks of {block}"
        return None
    if name == "aten.transpose.int":
        return "transposes the last dim" if rin - 1 in (_dim_arg(n, 1, rin), _dim_arg(n, 2, rin)) else None
    if name == "aten.permute":
        return None if n.args[1][-1] % rin == rin - 1 else "moves the last dim"
    if name == "aten.expand":
        return None if int(vout.shape[-1]) == int(vin.shape[-1]) else "expands the last dim"
    if name == "aten.unsqueeze":
        return None if n.args[1] % (rin + 1) != rin else "adds a new last dim"
    return None if _dim_arg(n, 1, rin) != rin - 1 else "indexes the last dim"


def stream(gm: torch.fx.GraphModule, seeds: list, block: int, norms: bool) -> Stream:
    s = Stream(block)
    fwd, bwd = list(seeds), list(seeds)
    s.nodes.update(seeds)
    full = {_last(x) for x in seeds}

    def join(n):
        if n not in s.nodes:
            s.nodes.add(n)
            fwd.append(n)
            bwd.append(n)

    while fwd or bwd:
        if fwd:
            x = fwd.pop()
            for u in list(x.users):
                _reader(s, x, u, join, full, norms)
        else:
            _origin(s, bwd.pop(), join, norms)
    return s


def _reader(s: Stream, x, u, join, full, norms: bool) -> None:
    """Classify the op u that reads the stream tensor x."""
    name = op_name(u)
    if u.op == "output":
        raise refuse(u, f"the graph returns {x.name} from the rotated stream; nothing can undo the rotation")
    if name in _IGNORED or u in s.nodes:
        return
    if name == "aten.linear" and u.args[0] is x and _const_weight(u.args[1]) and u.args[1] is not x:
        if u not in s.sinks:
            s.sinks.append(u)
        return
    if name == "aten.pow.Tensor_Scalar" and u.args[1] == 2:
        means = [m for m in u.users if op_name(m) not in _IGNORED]
        ok = means and all(op_name(m) == "aten.mean.dim" and len(m.args) > 2 and m.args[2]
                           and [d % _val(x).dim() for d in m.args[1]] == [_val(x).dim() - 1] for m in means)
        if not ok:
            raise refuse(u, "x**2 is used for something else than a mean over the last dim (RMS statistics)")
        if s.block not in full:
            raise refuse(u, f"RMS statistics are invariant only under a rotation of the whole last dim, not blocks of {s.block}")
        s.stats.append(u)
        return
    if name in _SAFE:
        if name == "aten.dropout" and len(u.args) > 2 and u.args[2]:
            raise refuse(u, "dropout in training mode")
        return join(u)
    if name in _LAYOUT:
        why = _layout_ok(u, x, s.block)
        if why:
            raise refuse(u, why)
        return join(u)
    if name in ("aten.add.Tensor", "aten.sub.Tensor"):
        a, b = u.args[0], u.args[1]
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
            raise refuse(u, "adds a constant to the rotated tensor (a bias that is not rotated with it)")
        if _val(a) is not None and _val(b) is not None and _val(a).shape[-1] != _val(b).shape[-1]:
            raise refuse(u, "adds tensors that broadcast along the last dim")
        join(a)
        join(b)
        return join(u)
    if name in ("aten.mul.Tensor", "aten.div.Tensor"):
        other = u.args[1] if u.args[0] is x else u.args[0]
        if other is x:
            raise refuse(u, "squares the rotated tensor elementwise")
        if _is_row_scalar(other) and (name == "aten.mul.Tensor" or u.args[0] is x):
            return join(u)
        if norms and name == "aten.mul.Tensor" and _norm_weight(u, x):
            s.norm_weights.append(u)
            return join(u)
        raise refuse(u, f"multiplies the rotated tensor elementwise by {getattr(other, 'name', other)}, "
                        "which varies along the last dim")
    if name == "aten.layer_norm" and norms and u.args[0] is x:
        s.layer_norms.append(u)
        return join(u)
    if name == "aten.matmul" and u.args[1] is x and u.args[0] is not x:
        return join(u)
    raise refuse(u, f"reads the rotated tensor {x.name} with an op that does not commute with a rotation")


def _origin(s: Stream, n, join, norms: bool) -> None:
    """Make sure the stream tensor n comes from producers the rotation can be folded into."""
    name = op_name(n)
    if name == "aten.linear" and _const_weight(n.args[1]):
        if n not in s.producers:
            s.producers.append(n)
        return
    if name == "aten.embedding" and _const_weight(n.args[0]):
        if n not in s.producers:
            s.producers.append(n)
        return
    if name in _SAFE or name in _LAYOUT or name == "aten.layer_norm":
        if name in _LAYOUT:
            why = _layout_ok(n, n.args[0], s.block)
            if why:
                raise refuse(n, why)
        return join(n.args[0])
    if name in ("aten.add.Tensor", "aten.sub.Tensor"):
        for a in n.args[:2]:
            if not isinstance(a, torch.fx.Node):
                raise refuse(n, "adds a constant to the rotated tensor")
            join(a)
        return
    if name in ("aten.mul.Tensor", "aten.div.Tensor"):
        stream_args = [a for a in n.args[:2] if isinstance(a, torch.fx.Node) and not _is_row_scalar(a)
                       and not (norms and n in s.norm_weights and _const_weight(a))]
        if len(stream_args) == 1:
            return join(stream_args[0])
        raise refuse(n, "an elementwise product that is not a per-row scale")
    if name == "aten.matmul":
        return join(n.args[1])
    where = "a graph input" if n.op == "placeholder" else "an op the rotation cannot be folded into"
    raise refuse(n, f"the rotated tensor comes from {where}; only linear layers and embeddings can absorb it")
