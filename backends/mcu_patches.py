"""Patch-based inference of a CNN's first stages (MCUNetV2, Lin et al. 2021): the spatial
prefix of the integer IR runs as P x P patches with the halo each needs, and the patches of
its (small, downsampled) output are stitched together, so the large early activations never
exist at full size.

The prefix is a subgraph from the model's input of ops that map NCHW to NCHW locally:
elementwise ops (`qc.quantize` / `dequantize` / `requantize`, relu, hardtanh (ReLU6), clamp,
add / mul of two activations: residual blocks), windowed ops (`qc.conv2d_int`, depthwise
and padded ones included; unpadded `max_pool2d`) and constant pads (`aten.pad`, SAME
padding). It ends at a cut: a node that is the only value the prefix passes on. Among the
cuts, the one with the smallest estimated peak (the patches' live bytes from their regions,
against the rest of the graph's, both from FX liveness) is taken, the earliest within 5%.

Regions. For output rows [a, b) of a windowed op (kernel k, stride s, padding p, dilation d)
the input rows needed are [a*s - p, (b-1)*s - p + d*(k-1) + 1); of a pad (before p) they are
[a - p, b - p); of an elementwise op they are [a, b). A value read by several ops in the
prefix (a residual) is computed over the hull of what they need and each reader slices its
part. What falls outside the tensor is padding: added explicitly to the patch with the op's
own padding value (the conv's input zero point, the pad's constant) on the sides where the
patch meets the border, after which the op runs unpadded. That is the same arithmetic as the
unsplit op's padding, so the stitched result is bit-exact.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx

from qcompiler.errors import LoweringError
from qcompiler.ir import op_name

ELEMENTWISE = {"qc.quantize", "qc.dequantize", "qc.requantize", "aten.relu", "aten.relu6", "aten.hardtanh",
               "aten.clamp", "aten.add", "aten.mul", "aten.sub"}
WINDOWED = {"qc.conv2d_int", "aten.max_pool2d"}
PADS = {"aten.pad", "aten.constant_pad_nd"}
SHAPE_ONLY = {"aten.sym_size"}  # users that read the batch size, not the data
TOLERANCE = 1.05  # the earliest cut whose estimate is within 5% of the best


def _name(node) -> str:
    return ".".join(op_name(node).split(".")[:2])


def _val(node):
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _shape(node) -> tuple | None:
    val = _val(node)
    return tuple(val.shape) if val is not None else None


def _bytes(node) -> int:
    """Bytes of one sample of a node's value (the batch dimension dropped)."""
    val = _val(node)
    return 0 if val is None else math.prod(int(s) for s in val.shape[1:]) * val.element_size()


def _kept(node) -> bool:
    """Whether the MCU program keeps node's value in memory: it is read by a windowed op or a
    pad (whose input the fused kernel holds whole: the conv's int32 accumulators), or by
    several ops (a residual). Chains of elementwise ops are fused into their producer."""
    users = [u for u in node.users if not _shape_only(u)]
    return len(users) != 1 or users[0].op != "call_function" or _name(users[0]) in WINDOWED | PADS


def _shape_only(node) -> bool:
    return node.op == "call_function" and _name(node) in SHAPE_ONLY


def _pads(node) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) of a pad node."""
    p = list(node.args[1]) + [0] * 4
    return p[0], p[1], p[2], p[3]


def _constant_ok(node, arg) -> bool:
    """A constant operand of an elementwise op is the same at every pixel (per tensor or per
    channel), so a patch can use it as is."""
    val = _val(arg)
    if val is None or val.numel() == 1:
        return True
    if _name(node) == "qc.requantize":
        return node.args[6] in (0, 1, -3, -4)  # per channel, not per row or column
    return val.dim() >= 3 and tuple(val.shape[-2:]) == (1, 1)


def local(node, inside: set) -> bool:
    """Whether node computes each output pixel from a window of its spatial inputs (all in
    `inside`), so a patch of it can be computed from patches of them."""
    name = _name(node)
    out = _shape(node)
    if node.op != "call_function" or out is None or len(out) != 4:
        return False
    if any(isinstance(v, torch.fx.Node) for v in node.kwargs.values()):
        return False
    spatial = [a for a in node.all_input_nodes if a in inside]
    others = [a for a in node.all_input_nodes if a not in inside]
    if name in ELEMENTWISE:
        if name == "qc.quantize" and len(node.args) > 5 and node.args[5] or \
                name == "qc.dequantize" and len(node.args) > 3 and node.args[3]:
            return False  # grouped scales
        return bool(spatial) and all(_shape(a) is not None and _shape(a)[-2:] == out[-2:] for a in spatial) \
            and all(a.op == "get_attr" and _constant_ok(node, a) for a in others)
    if name in WINDOWED:
        if spatial != [node.args[0]] or any(a.op != "get_attr" for a in others):
            return False
        return name != "aten.max_pool2d" or not (len(node.args) > 3 and any(node.args[3])
                                                 or len(node.args) > 5 and node.args[5])
    if name in PADS:
        mode = "constant" if name == "aten.constant_pad_nd" else \
            node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        pads = list(node.args[1])
        return (spatial == [node.args[0]] and mode == "constant" and len(pads) <= 4 and min(pads) >= 0
                and all(isinstance(p, int) for p in pads))
    return False


def cuts(gm: torch.fx.GraphModule) -> tuple[torch.fx.Node | None, list[tuple[list, torch.fx.Node]]]:
    """The model's 4-D input and the possible prefixes: (nodes in order, cut node) for every
    point where the local subgraph grown from the input passes on one value only."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and _shape(n) and len(_shape(n)) == 4]
    if not inputs:
        return None, []
    source = inputs[0]
    inside, order, found = {source}, [], []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not any(a in inside for a in node.all_input_nodes) or _shape_only(node):
            continue
        if not local(node, inside):
            break
        inside.add(node)
        order.append(node)
        open_ = [n for n in inside if any(u not in inside and not _shape_only(u) for u in n.users)]
        if open_ == [node] and any(_name(n) in WINDOWED for n in order):
            found.append((list(order), node))
    return source, found


def spatial_prefix(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The longest prefix of local NCHW ops from the first input (empty if there is none)."""
    found = cuts(gm)[1]
    return found[-1][0] if found else []


def _window(node):
    """(kernel, stride, padding, dilation) per spatial axis of a windowed node."""
    if _name(node) == "qc.conv2d_int":
        w = node.args[2].meta["val"]
        return tuple(w.shape[2:]), tuple(node.args[4]), tuple(node.args[5]), tuple(node.args[6])
    k = tuple(node.args[1])
    s = tuple(node.args[2]) if len(node.args) > 2 and node.args[2] else k
    d = tuple(node.args[4]) if len(node.args) > 4 else (1, 1)
    return k, s, (0, 0), d


def _needed(node, lo: int, hi: int, axis: int, size: int) -> tuple[int, int, int, int]:
    """Input range [lo', hi') clipped to [0, size) for output range [lo, hi) along spatial
    axis 0 (rows) or 1 (columns), and the padding (before, after) the clipped range lacks."""
    name = _name(node)
    if name in WINDOWED:
        k, s, p, d = (v[axis] for v in _window(node))
        a, b = lo * s - p, (hi - 1) * s - p + d * (k - 1) + 1
    elif name in PADS:
        before = _pads(node)[2 - 2 * axis]
        a, b = lo - before, hi - before
    else:
        return lo, hi, 0, 0
    return max(a, 0), min(b, size), max(0, -a), max(0, b - size)


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    cuts_ = [round(i * n / parts) for i in range(parts + 1)]
    return [(cuts_[i], cuts_[i + 1]) for i in range(parts) if cuts_[i + 1] > cuts_[i]]


def regions(prefix, source, end, rows, cols) -> tuple[dict, dict]:
    """Per node of the prefix (and the source) the rows x columns it computes for the patch
    `rows x cols` of `end`; per (reader, value) the clipped ranges and padding it reads."""
    region = {end: (rows, cols)}
    need = {}
    spatial = set(prefix) | {source}
    for node in reversed(prefix):
        r = region[node]
        for arg in dict.fromkeys(a for a in node.all_input_nodes if a in spatial):
            size = _shape(arg)
            ranges = [_needed(node, *r[ax], ax, size[2 + ax]) for ax in (0, 1)]
            need[(node, arg)] = ranges
            have = region.get(arg)
            span = tuple((rg[0], rg[1]) for rg in ranges)
            region[arg] = span if have is None else tuple((min(h[0], s[0]), max(h[1], s[1]))
                                                         for h, s in zip(have, span))
    return region, need


def _live_peak(nodes, size_of) -> int:
    """Largest sum of live value sizes over the nodes in order (a value lives from its node
    to its last reader among them; a reader fused into the op after it (`_kept` false) holds
    its inputs until that op's kernel ends)."""
    at = {n: i for i, n in enumerate(nodes)}

    def sink(n):  # the node whose kernel computes n
        while not _kept(n):
            n = next(u for u in n.users if not _shape_only(u))
            if n not in at:
                return None
        return n

    last = {}
    for i, n in enumerate(nodes):
        end = sink(n)
        for a in n.all_input_nodes:
            last[a] = max(last.get(a, 0), at[end] if end is not None else len(nodes))
    dying: dict[int, list] = {}
    for n in nodes:
        if n in last:
            dying.setdefault(last[n], []).append(n)
    live = peak = 0
    for i, n in enumerate(nodes):
        live += size_of(n)
        peak = max(peak, live)
        live -= sum(size_of(m) for m in dying.get(i, ()))
    return peak


def estimate(gm, source, prefix, end, parts) -> tuple[int, int]:
    """(patch peak, rest peak) in bytes for one cut: the largest patch's live bytes from its
    regions plus the stitched output, and the rest of the graph's, from FX liveness of the
    values the program keeps (`_kept`)."""
    _, _, h, w = _shape(end)
    patch = 0
    for rows in _bounds(h, parts)[:2]:
        for cols in _bounds(w, parts)[:2]:
            region, _ = regions(prefix, source, end, rows, cols)
            per_pixel = {n: _bytes(n) / (_shape(n)[2] * _shape(n)[3]) for n in prefix}
            patch = max(patch, _live_peak(prefix, lambda n: _kept(n) * int(
                per_pixel[n] * (region[n][0][1] - region[n][0][0]) * (region[n][1][1] - region[n][1][0]))))
    inside = set(prefix)
    rest = [n for n in gm.graph.nodes if n.op == "call_function" and n not in inside and not _shape_only(n)]
    later = rest[next((i for i, n in enumerate(rest) if end in n.all_input_nodes), len(rest)):]
    return patch + _bytes(end), _live_peak([end] + later, lambda n: _kept(n) * _bytes(n))


def choose(gm, parts: int):
    """(source, prefix, end) of the cut with the smallest estimated peak (earliest within 5%)."""
    source, found = cuts(gm)
    if not found:
        raise LoweringError("patch-based inference needs a CNN whose input feeds convolutions directly "
                            "(quantize, conv2d, pad, requantize, relu/hardtanh, add, max_pool2d); this model "
                            "has no such prefix")
    scored = [(max(estimate(gm, source, prefix, end, parts)), prefix, end) for prefix, end in found]
    best = min(s for s, _, _ in scored)
    _, prefix, end = next(t for t in scored if t[0] <= best * TOLERANCE)
    return source, prefix, end


def split_patches(gm: torch.fx.GraphModule, parts: int) -> tuple[torch.fx.GraphModule, str]:
    """A copy of gm whose spatial prefix runs in parts x parts patches; and a description."""
    gm = copy.deepcopy(gm)
    source, prefix, end = choose(gm, parts)
    _, _, h_out, w_out = _shape(end)
    if parts < 2 or parts > min(h_out, w_out):
        raise LoweringError(f"patches={parts}: the prefix ends at {h_out}x{w_out}, so 2..{min(h_out, w_out)} "
                            "patches per side are possible")
    graph = gm.graph
    rows = []
    with graph.inserting_before(end.next):
        for r in _bounds(h_out, parts):
            row = [_patch(graph, prefix, source, end, r, c) for c in _bounds(w_out, parts)]
            rows.append(graph.call_function(torch.ops.aten.cat.default, (row, 3)) if len(row) > 1 else row[0])
        stitched = graph.call_function(torch.ops.aten.cat.default, (rows, 2)) if len(rows) > 1 else rows[0]
    stitched.meta = dict(end.meta)
    end.replace_all_uses_with(stitched)
    for node in reversed(prefix):
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    names = [_name(n) for n in prefix]
    if len(names) <= 12:
        what = " -> ".join(names)
    else:
        what = ", ".join(f"{names.count(k)} {k}" for k in dict.fromkeys(names))
    return gm, f"{len(prefix)} ops ({what}) in {parts}x{parts} patches of the {h_out}x{w_out} output"


def _slice(graph, value, have, want):
    """value (computed over rows x cols `have`) cut down to `want` (both absolute ranges)."""
    for axis, (h, w) in enumerate(zip(have, want)):
        if h != w:
            value = graph.call_function(torch.ops.aten.slice.Tensor, (value, 2 + axis, w[0] - h[0], w[1] - h[0]))
    return value


def _patch(graph, prefix, source, end, rows, cols):
    """Nodes computing output rows x cols of `end` from the input."""
    region, need = regions(prefix, source, end, rows, cols)
    full = tuple((0, s) for s in _shape(source)[2:])
    value = {source: _slice(graph, source, full, region[source])}
    for node in prefix:
        args = list(node.args)
        pad = None
        for i, a in enumerate(args):
            if isinstance(a, torch.fx.Node) and a in value:
                (r0, r1, pt, pb), (c0, c1, pl, pr) = need[(node, a)]
                args[i] = _slice(graph, value[a], region[a], ((r0, r1), (c0, c1)))
                pad = [pl, pr, pt, pb]
        name = _name(node)
        if name in PADS:  # the pad itself: only the part of it this patch meets
            at = 2 if name == "aten.constant_pad_nd" else 3
            fill = node.args[at] if len(node.args) > at else node.kwargs.get("value")
            fill = 0.0 if fill is None else fill
            out = graph.call_function(torch.ops.aten.constant_pad_nd.default, (args[0], pad, fill)) \
                if any(pad) else args[0]
        else:
            if name == "qc.conv2d_int":
                if any(pad):
                    args[0] = graph.call_function(torch.ops.aten.constant_pad_nd.default, (args[0], pad, node.args[1]))
                args[5] = [0, 0]
            out = graph.call_function(node.target, tuple(args), dict(node.kwargs))
        if "qc" in node.meta:
            out.meta["qc"] = dict(node.meta["qc"])  # layer widths for weights.collect
        value[node] = out
    return value[end]
