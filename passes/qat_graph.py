"""Training views of the IR: the graphs QAT runs for the student and the teacher.

A view is a new `GraphModule` over a copy of the IR's graph that shares the IR's tensors (so
training the view trains the IR) and returns `(outputs..., captured values...)`:

- captures: intermediate values a loss reads (distilled activations, quantized queries/keys);
- intervention (Teacher Intervention, Kim et al. 2023): the listed nodes' *uses* read a new
  input instead, fed the teacher's value there, while the student's own value is still
  captured (so the part before the node keeps training on it);
- adapters: a weight quantizer's input W becomes W + scale * B @ A (low-rank, trained through
  the quantizer; `qat_lora`);
- the fake quantizers call `qat_fq.fake_quant_train` (the same forward, cheaper gradients);
- bias rounding: `convert` stores a quantized op's bias as round(b / (s_x s_w)) in int32, so the
  student view quantizes it on that grid too (straight-through): training sees the deployed
  arithmetic, and `snap_biases` puts the IR's biases on the grid when training ends.

`float_teacher` is the default teacher: a copy of the IR with every `qc.fake_quant` bypassed,
i.e. the float model the IR was traced from (with batch norms folded), taken before training;
where gptq replaced a weight by its rounded copy, the teacher reads the float weight gptq kept
(`meta["qc"]["float_weight"]`), not the rounded one.
"""

from __future__ import annotations

import torch
import torch.fx

from qcompiler.errors import TrainingError
from qcompiler.ir import cleanup, copy_ir, op_name

from .qat_fq import use_training_fake_quant


def flat_outputs(gm: torch.fx.GraphModule) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return list(out) if isinstance(out, (list, tuple)) else [out]


def without_quantizers(gm: torch.fx.GraphModule, keep: frozenset = frozenset()) -> torch.fx.GraphModule:
    """A copy of a fake-quant IR with every `qc.fake_quant` whose node name is not in `keep`
    replaced by its input, or by the float weight a rounding pass (gptq) replaced with its
    rounded one; with `keep` empty, the float model."""
    t = copy_ir(gm)
    for n in list(t.graph.nodes):
        if n.op == "call_function" and op_name(n) == "qc.fake_quant" and n.name not in keep:
            src = n.args[0]
            if "float_weight" in n.meta.get("qc", {}):
                with t.graph.inserting_before(n):
                    src = t.graph.get_attr(n.meta["qc"]["float_weight"])
            n.replace_all_uses_with(src)
            t.graph.erase_node(n)
    cleanup(t)
    return t


def float_teacher(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A frozen float copy of a fake-quant IR (`without_quantizers`)."""
    t = without_quantizers(gm)
    for p in list(t.parameters()) + list(t.buffers()):
        p.requires_grad_(False)
    return t.eval()


def teacher_name(node: torch.fx.Node) -> str:
    """The float node a student node corresponds to: a quantizer's float input."""
    while op_name(node) == "qc.fake_quant":
        node = node.args[0]
    return node.name


def view(gm: torch.fx.GraphModule, captures: list[str] = (), intervene: list[str] = (),
         adapters: dict | None = None, what: str = "student") -> torch.fx.GraphModule:
    """A training view of `gm` (see the module docstring). `adapters` maps a weight
    quantizer's node name to (A, B, scale) parameters."""
    g = torch.fx.Graph()
    env: dict = {}
    out = g.graph_copy(gm.graph, env)
    by_name = {n.name: env[n] for n in gm.graph.nodes if n in env}
    nodes = [_lookup(by_name, name, what) for name in captures]
    attrs = {n.target: _attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, (a, b, scale) in (adapters or {}).items():
        fq = by_name[name]
        w = fq.args[0]
        with g.inserting_before(fq):
            na, nb = g.get_attr(f"{name}_lora_A"), g.get_attr(f"{name}_lora_B")
            delta = g.call_function(torch.ops.aten.mm.default, (nb, na))
            delta = g.call_function(torch.ops.aten.reshape.default, (delta, list(attrs[w.target].shape)))
            delta = g.call_function(torch.ops.aten.mul.Tensor, (delta, scale))
            fq.update_arg(0, g.call_function(torch.ops.aten.add.Tensor, (w, delta)))
        attrs[na.target], attrs[nb.target] = a, b
    for node in list(g.nodes):
        if bias_on_grid(node) is not None:
            _quantize_bias(g, node)
    use_training_fake_quant(g)
    anchor = [n for n in g.nodes if n.op == "placeholder"][-1]  # new inputs come after the model's
    for name in intervene:
        node = _lookup(by_name, name, what)
        with g.inserting_after(anchor):
            ph = anchor = g.placeholder(f"teacher_{name}")
        ph.meta = dict(node.meta)
        node.replace_all_uses_with(ph)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    g.output(tuple(outs + nodes))
    g.eliminate_dead_code()
    return torch.fx.GraphModule(attrs, g, class_name=f"QAT{what.capitalize()}")


def bias_on_grid(node: torch.fx.Node):
    """(bias, x quantizer, w quantizer) of a quantized linear/conv2d whose bias `convert`
    rounds to the accumulator grid s_x * s_w (per channel), else None."""
    qc = node.meta.get("qc", {})
    if not qc.get("quantized") or qc.get("kind") not in ("linear", "conv2d") or qc.get("group_size"):
        return None
    x, w, b = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
    if not isinstance(b, torch.fx.Node) or b.op != "get_attr":
        return None
    if not all(op_name(q) == "qc.fake_quant" and q.args[1].op == "get_attr" for q in (x, w)):
        return None
    return b, x, w


def _quantize_bias(g: torch.fx.Graph, node: torch.fx.Node) -> None:
    """bias -> fake_quant(bias, s_x * s_w): the training view adds the integer bias rounding."""
    b, x, w = bias_on_grid(node)
    with g.inserting_before(node):
        s = g.call_function(torch.ops.aten.mul.Tensor,
                            (x.args[1], g.call_function(torch.ops.aten.reshape.default, (w.args[1], [-1]))))
        z = g.call_function(torch.ops.aten.zeros_like.default, (s,))
        node.update_arg(2, g.call_function(torch.ops.qc.fake_quant.default, (b, s, z, -(2**31) + 1, 2**31 - 1, 0)))


def require_nodes(by_name: dict, names, what: str = "student") -> None:
    """Raise a TrainingError naming similar nodes unless every name is a node."""
    for name in names:
        _lookup(by_name, name, what)


def _lookup(by_name: dict, name: str, what: str) -> torch.fx.Node:
    if name not in by_name:
        close = [n for n in by_name if n.split("_")[0] == name.split("_")[0]][:8]
        like = f" (nodes like it: {', '.join(close)})" if close else ""
        raise TrainingError(f"the {what} IR has no node {name!r}{like}"
                            + "; name nodes as `qcompiler.print_ir` shows them (without the %)")
    return by_name[name]


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@torch.no_grad()
def snap_biases(gm: torch.fx.GraphModule) -> int:
    """b <- round(b / s) * s with s = s_x * s_w as `convert` computes it, so the fake-quant IR
    and the integer IR add the same bias; returns the number of biases snapped."""
    count = 0
    for node in gm.graph.nodes:
        found = bias_on_grid(node)
        if found is None:
            continue
        b, x, w = (_attr(gm, n.target) for n in (found[0], found[1].args[1], found[2].args[1]))
        s = (float(x) * w.double().flatten()).float().double()
        b.copy_((torch.round(b.double() / s) * s).to(b.dtype))
        count += 1
    return count


def attentions(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]]:
    """(softmax, query, key) of every attention: a softmax whose input is a matmul's product
    through scaling/masking ops, with the matmul's operands, the key taken before its
    transpose (so a quantized matmul's own quantizers, or KV-cache quantizers)."""
    score_ops = {"aten.div.Tensor", "aten.mul.Tensor", "aten.add.Tensor", "aten.sub.Tensor", "aten.to.dtype",
                 "aten._to_copy", "aten.masked_fill.Scalar", "aten.where.self", "aten.div.Scalar", "aten.mul.Scalar"}
    found = []
    for sm in gm.graph.nodes:
        if op_name(sm) not in ("aten.softmax.int", "aten._softmax"):
            continue
        frontier, matmul = [sm.args[0]], None
        for _ in range(5):
            matmul = next((n for n in frontier if op_name(n) == "aten.matmul"), None)
            if matmul is not None:
                break
            frontier = [a for n in frontier if op_name(n) in score_ops for a in n.args if isinstance(a, torch.fx.Node)]
        if matmul is None:
            continue
        q, k = matmul.args[0], matmul.args[1]
        if op_name(k) == "aten.transpose.int":
            k = k.args[0]
        found.append((sm, q, k))
    return found


def attention_qk(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(query, key) pairs of every attention (`attentions`) whose queries or keys are quantized."""
    return [(q, k) for _, q, k in attentions(gm) if any(op_name(x) == "qc.fake_quant" for x in (q, k))]


def quantized_qk(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The fake-quants among the (query, key) operands of `attention_qk`: what EdgeQAT's terms act on."""
    return [x for pair in attention_qk(gm) for x in pair if op_name(x) == "qc.fake_quant"]


@torch.no_grad()
def qk_entropy(gm: torch.fx.GraphModule, batches: list[tuple]) -> dict[str, float]:
    """Mean Shannon entropy (bits) of the integer codes of every quantized query and key
    (`qat_losses.code_entropy`), over `batches`: what EdgeQAT's entropy loss raises."""
    from .qat_losses import code_entropy, code_grids

    fqs = quantized_qk(gm)
    if not fqs:
        return {}
    grids = code_grids(fqs)
    names = [name for g in grids for name in g.names]
    v = view(gm, names, what="entropy probe")
    n_out = len(flat_outputs(gm))
    sums = {fq.name: 0.0 for fq in fqs}
    for batch in batches:
        values = dict(zip(names, v(*batch)[n_out:]))
        for fq, g in zip(fqs, grids):
            sums[fq.name] += code_entropy(g.codes(values), g.qmin, g.qmax)
    return {k: s / len(batches) for k, s in sums.items()}
