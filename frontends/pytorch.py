"""The PyTorch frontend: `torch.nn.Module` (or a torch.export file's module) -> the IR.

`trace` exports a model with `torch.export` at ATen level, with dimension 0 of every input
dynamic (`Dim.AUTO`), so one IR calibrates, trains and evaluates at any batch size. An
example batch of 1 is traced at 2, since torch.export specializes sizes 0 and 1. Where no
dynamic trace exists the IR is static and calibration then needs batches of the example size.
"""

from __future__ import annotations

import torch
import torch.fx

from qcompiler.errors import TraceError
from qcompiler.ir import as_tuple, widen_batch


def trace(model: torch.nn.Module, example_inputs, *, dynamic_batch: bool = True) -> torch.fx.GraphModule:
    """Export `model` at ATen level into the IR (a GraphModule) with a dynamic batch dim."""
    if isinstance(model, torch.fx.GraphModule) and "qc" in model.meta:
        return model
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"qcompiler.trace takes a torch.nn.Module, got {type(model).__name__}")
    args = as_tuple(example_inputs)
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise TraceError(f"example input {i} is a {type(a).__name__}; pass tensors only")
    try:
        model.eval()
    except NotImplementedError:  # modules unflattened from torch.export refuse eval(); they are
        pass  # already in inference form
    ep, dynamic = None, False
    if dynamic_batch and all(a.dim() > 0 for a in args):
        # A batch of 1 would be specialized by torch.export (0/1 specialization): trace at 2.
        wide = args if all(a.shape[0] != 1 for a in args) else widen_batch(args)
        try:
            ep = torch.export.export(model, wide, dynamic_shapes=tuple({0: torch.export.Dim.AUTO} for _ in args))
            dynamic = all(isinstance(v.shape[0], torch.SymInt) for v in _input_vals(ep))
        except Exception:
            ep = None  # fall back to static shapes; a real tracing problem shows up below
        if ep is not None and not dynamic and wide is not args:
            ep = None  # torch.export fixed the widened batch: trace again at the example's own shapes
    if ep is None:
        try:
            ep = torch.export.export(model, args)
        except Exception as e:  # torch raises many types here; all mean "cannot trace"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TraceError(
                f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: {first}\n"
                "What to try: make Python control flow that depends on tensor values static "
                "(or use torch.cond), avoid .item()/.tolist()/numpy calls inside forward, "
                "and return only tensors; see torch.export's error above for the exact line."
            ) from e
    gm = ep.module()
    drop_input_guards(gm)
    gm.meta["qc"] = {"example_inputs": tuple(a.detach().clone() for a in args), "dynamic_batch": dynamic}
    return gm


def _input_vals(ep) -> list:
    """The fake values of an exported program's user inputs."""
    names = set(ep.graph_signature.user_inputs)
    return [n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder" and n.name in names]


def drop_input_guards(gm: torch.fx.GraphModule) -> None:
    """Remove torch.export's `_guards_fn` input checks: a model loaded from a static .pt2
    carries its old batch-size guard into the new trace. qcompiler checks its inputs itself
    (`calibrate.check_batch`, `Artifact.__call__`)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn":
            gm.graph.erase_node(n)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()
