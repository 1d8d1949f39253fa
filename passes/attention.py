"""Find scaled dot-product attention in the IR, for the passes that treat its parts alone
(rotate's key rotation, KV-cache quantization in fake-quant, TanQ on attention probabilities).

The pattern, as `torch.export` writes eager attention:

    scores = matmul(q, transpose(k, -2, -1))       (then scale, mask: mul/div/add)
    probs  = softmax(scores, -1)                   (then to/dropout)
    out    = matmul(probs, v)

Activation fake-quants on the matmuls' operands are seen through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx

from qcompiler.ir import op_name

_PASS = {"aten.to.dtype", "aten.dropout", "aten.contiguous", "aten.clone", "aten.alias"}
_SCORE_OPS = {"aten.mul.Tensor", "aten.div.Tensor", "aten.add.Tensor", "aten.sub.Tensor", "aten.to.dtype"}


@dataclass
class Attention:
    scores: torch.fx.Node  # matmul(q, k^T)
    q: torch.fx.Node
    k: torch.fx.Node  # the keys before the transpose
    k_t: torch.fx.Node  # transpose(k)
    softmax: torch.fx.Node
    probs: torch.fx.Node  # what the second matmul reads (softmax after to/dropout)
    pv: torch.fx.Node  # matmul(probs, v)
    v: torch.fx.Node


def _is_act_fq(n) -> bool:
    return (isinstance(n, torch.fx.Node) and op_name(n) == "qc.fake_quant"
            and n.meta.get("qc", {}).get("role", "").startswith("act"))


def _through_fq(n):
    """The tensor an activation fake-quant reads (n itself otherwise)."""
    return n.args[0] if _is_act_fq(n) else n


def _rank(n) -> int | None:
    val = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    return val.dim() if val is not None else None


def _is_last_two_transpose(n) -> bool:
    if op_name(n) != "aten.transpose.int":
        return False
    rank = _rank(n.args[0])
    if rank is None:
        return False
    return sorted(d % rank for d in n.args[1:3]) == [rank - 2, rank - 1]


def _score_matmul(n, depth: int = 4):
    if not isinstance(n, torch.fx.Node) or depth < 0:
        return None
    if op_name(n) == "aten.matmul":
        return n
    if op_name(n) in _SCORE_OPS:
        for a in n.args:
            m = _score_matmul(a, depth - 1)
            if m is not None:
                return m
    return None


def find_attention(gm: torch.fx.GraphModule) -> list[Attention]:
    found = []
    for sm in gm.graph.nodes:
        if op_name(sm) not in ("aten.softmax.int", "aten._softmax"):
            continue
        scores = _score_matmul(sm.args[0])
        if scores is None or not _is_last_two_transpose(_through_fq(scores.args[1])):
            continue
        probs = sm
        while True:
            users = [u for u in probs.users if op_name(u) != "aten._assert_tensor_metadata"]
            if len(users) != 1 or not (op_name(users[0]) in _PASS or _is_act_fq(users[0])):
                break
            probs = users[0]
        pvs = [u for u in probs.users if op_name(u) == "aten.matmul" and u.args[0] is probs]
        if len(pvs) != 1:
            continue
        k_t = _through_fq(scores.args[1])
        found.append(Attention(scores, scores.args[0], k_t.args[0], k_t, sm, probs, pvs[0], pvs[0].args[1]))
    return found
