"""The IR as JSON plus tensors (no pickle): for artifacts, reproducers and bug reports.

`ir_to_json(gm)` returns `(graph, tensors)`: a JSON-able dict of the nodes (op names such as
`aten.linear.default`, arguments, `meta["qc"]`) and a dict of the graph's buffers and
parameters by name, to be stored with safetensors. `ir_from_json` rebuilds a GraphModule
that computes the same function; only ops of the `aten` and `qc` namespaces are resolved.
"""

from __future__ import annotations

import torch
import torch.fx

from .errors import ArtifactError

FORMAT = 1


def _encode(a):
    if isinstance(a, torch.fx.Node):
        return {"node": a.name}
    if isinstance(a, (list, tuple)):
        return {"list" if isinstance(a, list) else "tuple": [_encode(x) for x in a]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise ArtifactError(f"cannot serialize an argument of type {type(a).__name__}: {a!r}")


def _decode(a, env):
    if isinstance(a, dict):
        (kind, v), = a.items()
        if kind == "node":
            return env[v]
        if kind in ("list", "tuple"):
            items = [_decode(x, env) for x in v]
            return items if kind == "list" else tuple(items)
        if kind in ("dtype", "memory_format", "layout"):
            return getattr(torch, v)
        if kind == "device":
            return torch.device(v)
    return a


def _meta(m):
    if isinstance(m, dict):
        return {k: _meta(v) for k, v in m.items()}
    if isinstance(m, (list, tuple)):
        return [_meta(v) for v in m]
    return m if m is None or isinstance(m, (bool, int, float, str)) else str(m)


def _target_name(t) -> str:
    if not isinstance(t, torch._ops.OpOverload) or t.namespace not in ("aten", "qc"):
        raise ArtifactError(f"cannot serialize a call to {t}: only aten and qc ops are stored")
    return f"{t.namespace}.{t._schema.name.split('::')[-1]}.{t._overloadname}"


def _resolve(name: str):
    ns, op, overload = name.split(".")
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except AttributeError:
        raise ArtifactError(f"the stored IR calls {name}, which this torch does not have") from None


def ir_to_json(gm: torch.fx.GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
    nodes = []
    for n in gm.graph.nodes:
        if n.op == "call_module":  # torch.export's input guard: not part of the computation
            continue
        entry = {"name": n.name, "op": n.op}
        if n.op == "call_function":
            entry["target"] = _target_name(n.target)
            entry["args"] = [_encode(a) for a in n.args]
            entry["kwargs"] = {k: _encode(v) for k, v in n.kwargs.items()}
        elif n.op == "get_attr":
            entry["target"] = n.target
        elif n.op == "output":
            entry["args"] = [_encode(a) for a in n.args]
        if n.meta.get("qc"):
            entry["qc"] = _meta(n.meta["qc"])
        nodes.append(entry)
    tensors = {k: v.detach().contiguous() for k, v in list(gm.named_parameters()) + list(gm.named_buffers())}
    return {"format": FORMAT, "nodes": nodes}, tensors


def ir_from_json(graph: dict, tensors: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    if graph.get("format") != FORMAT:
        raise ArtifactError(f"IR format {graph.get('format')!r} is not the supported format {FORMAT}")
    root = torch.nn.Module()
    for name, t in tensors.items():
        _register(root, name, t)
    g = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    try:
        for e in graph["nodes"]:
            op, name = e["op"], e["name"]
            if op == "placeholder":
                node = g.create_node("placeholder", name, name=name)
            elif op == "get_attr":
                node = g.create_node("get_attr", e["target"], name=name)
            elif op == "call_function":
                args = tuple(_decode(a, env) for a in e["args"])
                kwargs = {k: _decode(v, env) for k, v in e["kwargs"].items()}
                node = g.create_node("call_function", _resolve(e["target"]), args, kwargs, name=name)
            elif op == "output":
                node = g.output(_decode(e["args"][0], env))
            else:
                raise ArtifactError(f"unknown node kind {op!r} in the stored IR")
            if "qc" in e:
                node.meta["qc"] = e["qc"]
            env[e["name"]] = node
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"the stored IR is malformed: {type(err).__name__}: {err}") from err
    gm = torch.fx.GraphModule(root, g)  # copies the tensors nodes read; the ones meta names (float weights) too:
    for name in {n.meta["qc"]["float_weight"] for n in g.nodes if "float_weight" in n.meta.get("qc", {})}:
        if name in tensors:
            _register(gm, name, tensors[name])
    return gm


def _register(root: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    """Register `t` as the buffer `name` (a dotted path) of `root`, creating submodules."""
    owner = root
    *path, leaf = name.split(".")
    for p in path:
        if not hasattr(owner, p):
            owner.add_module(p, torch.nn.Module())
        owner = getattr(owner, p)
    owner.register_buffer(leaf, t)
