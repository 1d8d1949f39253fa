"""Patch-based inference of a CNN's first stages (MCUNetV2, Lin et al. 2021): the spatial
prefix of the integer IR runs as P x P patches with the halo each needs, and the patches of
its (small, downsampled) output are stitched together, so the large early activations never
exist at full size.

The prefix is the chain from the model's input through ops that map NCHW to NCHW locally:
`qc.quantize`, `qc.requantize` (elementwise), `qc.conv2d_int` and `aten.max_pool2d` (no
padding), `aten.relu`; it ends before the first other op (e.g. flatten). For output patch
rows [a, b) of a conv (kernel k, stride s, padding p, dilation d) the input rows needed are
[a*s - p, (b-1)*s - p + d*(k-1) + 1), clipped to the tensor; what falls outside is the
padding, added explicitly with the conv's input zero point (`constant_pad_nd`) only on the
sides where the patch meets the border, and the conv then runs unpadded. That is the same
arithmetic as the conv's own zero-point padding, so the stitched result is bit-exact.
"""

from __future__ import annotations

import copy

import torch
import torch.fx

from qcompiler.errors import LoweringError
from qcompiler.ir import op_name

ELEMENTWISE = {"qc.quantize", "qc.requantize", "aten.relu"}
WINDOWED = {"qc.conv2d_int", "aten.max_pool2d"}


def _shape(node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def spatial_prefix(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The chain of local NCHW ops from the first input, in order (empty if there is none)."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and _shape(n) and len(_shape(n)) == 4]
    if not inputs:
        return []
    chain, cur = [], inputs[0]
    while True:
        users = [u for u in cur.users if u.op == "call_function"]
        if len(users) != 1 or len(cur.users) != 1:
            break
        nxt = users[0]
        name = ".".join(op_name(nxt).split(".")[:2])
        if name not in ELEMENTWISE | WINDOWED or nxt.args[0] is not cur or not _shape(nxt) or len(_shape(nxt)) != 4:
            break
        if name == "aten.max_pool2d" and (len(nxt.args) > 3 and any(nxt.args[3]) or len(nxt.args) > 5 and nxt.args[5]):
            break  # padded or ceil-mode pooling: not split
        chain.append(nxt)
        cur = nxt
    return chain if any(".".join(op_name(n).split(".")[:2]) in WINDOWED for n in chain) else []


def _window(node):
    """(kernel, stride, padding, dilation) per spatial axis of a windowed node."""
    name = ".".join(op_name(node).split(".")[:2])
    if name == "qc.conv2d_int":
        w = node.args[2].meta["val"]
        return tuple(w.shape[2:]), tuple(node.args[4]), tuple(node.args[5]), tuple(node.args[6])
    k = tuple(node.args[1])
    s = tuple(node.args[2]) if len(node.args) > 2 and node.args[2] else k
    d = tuple(node.args[4]) if len(node.args) > 4 else (1, 1)
    return k, s, (0, 0), d


def _needed(node, lo: int, hi: int, axis: int, size: int) -> tuple[int, int, int, int]:
    """Input range [lo', hi') clipped to [0, size) for output range [lo, hi), and the padding
    (before, after) the clipped range lacks."""
    name = ".".join(op_name(node).split(".")[:2])
    if name not in WINDOWED:
        return lo, hi, 0, 0
    k, s, p, d = (v[axis] for v in _window(node))
    a, b = lo * s - p, (hi - 1) * s - p + d * (k - 1) + 1
    return max(a, 0), min(b, size), max(0, -a), max(0, b - size)


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    cuts = [round(i * n / parts) for i in range(parts + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(parts) if cuts[i + 1] > cuts[i]]


def split_patches(gm: torch.fx.GraphModule, parts: int) -> tuple[torch.fx.GraphModule, str]:
    """A copy of gm whose spatial prefix runs in parts x parts patches; and a description."""
    gm = copy.deepcopy(gm)
    chain = spatial_prefix(gm)
    if not chain:
        raise LoweringError("patch-based inference needs a CNN whose input feeds convolutions directly "
                            "(quantize, conv2d, requantize, relu, max_pool2d); this model has no such prefix")
    source = chain[0].args[0]
    end = chain[-1]
    _, _, h_out, w_out = _shape(end)
    if parts < 2 or parts > min(h_out, w_out):
        raise LoweringError(f"patches={parts}: the prefix ends at {h_out}x{w_out}, so 2..{min(h_out, w_out)} "
                            "patches per side are possible")
    graph = gm.graph
    rows = []
    with graph.inserting_before(end.next):
        for r0, r1 in _bounds(h_out, parts):
            row = []
            for c0, c1 in _bounds(w_out, parts):
                row.append(_patch(graph, chain, source, (r0, r1), (c0, c1)))
            rows.append(graph.call_function(torch.ops.aten.cat.default, (row, 3)) if len(row) > 1 else row[0])
        stitched = graph.call_function(torch.ops.aten.cat.default, (rows, 2)) if len(rows) > 1 else rows[0]
    stitched.meta = dict(end.meta)
    end.replace_all_uses_with(stitched)
    for node in reversed(chain):
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    names = " -> ".join(".".join(op_name(n).split(".")[:2]) for n in chain)
    return gm, f"{len(chain)} ops ({names}) in {parts}x{parts} patches of the {h_out}x{w_out} output"


def _patch(graph, chain, source, rows, cols):
    """Nodes computing output rows x cols of the chain's last op from the chain's input."""
    regions = [None] * len(chain)
    pads = [None] * len(chain)
    region = (rows, cols)
    for i in range(len(chain) - 1, -1, -1):
        node = chain[i]
        regions[i] = region
        size_in = _shape(node.args[0])
        (a, b, pa, pb), (c, d, pc, pd) = (_needed(node, *region[ax], ax, size_in[2 + ax]) for ax in (0, 1))
        pads[i] = (pc, pd, pa, pb)  # constant_pad_nd order: last dim first
        region = ((a, b), (c, d))
    (a, b), (c, d) = region
    cur = graph.call_function(torch.ops.aten.slice.Tensor, (source, 2, a, b))
    cur = graph.call_function(torch.ops.aten.slice.Tensor, (cur, 3, c, d))
    for node, pad in zip(chain, pads):
        name = ".".join(op_name(node).split(".")[:2])
        args = list(node.args)
        if name == "qc.conv2d_int":
            if any(pad):
                cur = graph.call_function(torch.ops.aten.constant_pad_nd.default, (cur, list(pad), node.args[1]))
            args[5] = [0, 0]
        args[0] = cur
        cur = graph.call_function(node.target, tuple(args), dict(node.kwargs))
        if "qc" in node.meta:
            cur.meta["qc"] = dict(node.meta["qc"])  # layer widths for weights.collect
    return cur
