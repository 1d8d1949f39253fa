"""Static memory plan of a flat Program (`program.py`) for a microcontroller: one arena.

Every intermediate lives in one static arena; nothing is allocated at run time.

1. Values. Relax plans storages that several tensors share over time; a kernel that writes a
   storage it does not also read (its sblocks' write regions say which parameters it writes)
   starts a new value there, sized by the tensors (views included) that value holds. So a
   storage Relax reused is split back into values with their own lifetimes.
2. Liveness. The program is a bipartite dataflow graph (networkx): a node per kernel call,
   a node per value, an edge value -> call for each use. With the calls in execution order
   0..n-1, a value is live from the call that writes it to the last call reading it; the
   outputs stay live to the end (n), where they are copied out.
3. Workspace. Call i's kernel asks the runtime for at most `workspace[kernel]` scratch
   bytes (TVM's allocations after its TIR pipeline, `program.workspace_bytes`): an item
   live over [i, i] only, so kernels' scratch shares memory with dead activations.
4. Offsets, greedy by size (TFLite Micro's GreedyMemoryPlanner): items sorted by size,
   largest first; each goes at the lowest offset (aligned to ALIGN) where it overlaps no
   placed item whose lifetime intersects its own. The arena is the highest end.

Inputs are read in place from the caller's buffers and constants stay in flash, so neither
takes arena bytes. `Plan.live_bytes[i]` is the arena bytes in use while call i runs (its
activations, those live across it, and its workspace): the per-layer SRAM figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from qcompiler.errors import LoweringError

from .program import BUFFER, Program

ALIGN = 16  # arena offsets (every tensor the C kernels read is at most 8-byte aligned data)


@dataclass(frozen=True)
class Item:
    name: str  # "buf<b>.<call>" (a value of buffer b written at call) or "ws<i>" (workspace of call i)
    size: int
    start: int  # first call it is live in
    end: int  # last call it is live in (inclusive); n = after the last call (outputs)


@dataclass
class Plan:
    arena_bytes: int
    offsets: dict[str, int]  # item name -> byte offset in the arena
    items: list[Item]
    live_bytes: list[int]  # per call: arena bytes live while it runs
    workspace: list[int] = field(default_factory=list)  # per call: scratch bytes reserved
    tensor_offsets: dict[int, int] = field(default_factory=dict)  # tensor index -> arena offset
    naive_bytes: int = 0  # Relax's storages and the largest workspace side by side (no arena plan)

    def tensor_offset(self, index: int) -> int:
        return self.tensor_offsets[index]

    def workspace_offset(self, call: int) -> int:
        return self.offsets.get(f"ws{call}", 0)


def written_args(func) -> set[int]:
    """Positions of the parameters a kernel writes (the buffers its blocks write)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    found, stack = [], [sch.get_sblock("root")]
    while stack:
        block = stack.pop()
        found += [w.source for w in sch.get(block).writes]
        stack += list(sch.get_child_blocks(block))
    return {i for i, p in enumerate(func.params) if any(p.same_as(b) for b in found)}  # params are the buffers' vars


def values(program: Program) -> tuple[list[Item], dict[int, str]]:
    """Each buffer's successive values: a kernel writing a buffer it does not also read starts
    a new value, which lives until the last call reading it (the outputs' to the end). A
    buffer holding tensors at several offsets stays one value. Returns the values (sized by
    the tensors they hold) and, per tensor index, the value holding it."""
    n = len(program.calls)
    writes = {gv.name_hint: written_args(f) for gv, f in program.kernels.functions.items()}
    shared = {t.index for t in program.tensors if t.home == BUFFER and t.offset}
    spans: dict[str, list[int]] = {}  # value -> [start, end, size]
    current: dict[int, str] = {}
    of: dict[int, str] = {}
    for i, call in enumerate(program.calls):
        bufs = [(pos, a, program.tensors[a]) for pos, a in enumerate(call.args) if program.tensors[a].home == BUFFER]
        read = {t.index for pos, _, t in bufs if pos not in writes[call.kernel]}
        for pos, a, t in bufs:
            fresh = pos in writes[call.kernel] and t.index not in read and t.index not in shared
            if t.index not in current or (fresh and spans[current[t.index]][0] != i):
                current[t.index] = f"buf{t.index}.{i}"
                spans[current[t.index]] = [i, i, 0]
            span = spans[current[t.index]]
            span[1] = i
            span[2] = max(span[2], program.buffers[t.index] if t.index in shared else t.offset + t.nbytes)
            of[a] = current[t.index]
    for a, t in enumerate(program.tensors):  # views never passed to a kernel (e.g. a reshaped output)
        if t.home == BUFFER and a not in of and t.index in current:
            of[a] = current[t.index]
    for a in program.outputs:
        if a in of:
            spans[of[a]][1] = n
    return [Item(name, size, start, end) for name, (start, end, size) in spans.items()], of


def dataflow_graph(program: Program) -> nx.DiGraph:
    """Values and calls as a bipartite graph: an edge value -> call for every use (and
    value -> ("out", 0) for the program's outputs); lifetimes are read off it."""
    items, of = values(program)
    g = nx.DiGraph()
    for i, call in enumerate(program.calls):
        g.add_node(("call", i), kernel=call.kernel)
        for a in call.args:
            if a in of:
                g.add_edge(("val", of[a]), ("call", i))
    for a in program.outputs:
        if a in of:
            g.add_edge(("val", of[a]), ("out", 0))
    return g


def lifetimes(program: Program) -> tuple[list[Item], dict[int, str]]:
    """The values with the lifetimes the dataflow graph gives them, and the tensor -> value map."""
    items, of = values(program)
    g = dataflow_graph(program)
    n = len(program.calls)
    out = []
    for it in items:
        steps = [n if node[0] == "out" else node[1] for node in g.successors(("val", it.name))]
        out.append(Item(it.name, it.size, min(steps + [it.start]), max(steps)))
    return out, of


def place(items: list[Item], align: int = ALIGN) -> dict[str, int]:
    """Greedy by size: the lowest aligned offset free over each item's lifetime."""
    offsets: dict[str, int] = {}
    placed: list[Item] = []
    for item in sorted(items, key=lambda i: (-i.size, i.start, i.name)):
        busy = sorted((offsets[p.name], offsets[p.name] + p.size) for p in placed
                      if p.start <= item.end and item.start <= p.end)
        at = 0
        for lo, hi in busy:
            if at + item.size <= lo:
                break
            at = max(at, -(-hi // align) * align)
        offsets[item.name] = at
        placed.append(item)
    return offsets


def plan(program: Program, workspace_scale: float = 1.0) -> Plan:
    """The arena plan: values by liveness plus each call's workspace, greedy by size."""
    items, of = lifetimes(program)
    workspace = [int(program.workspace.get(c.kernel, 0) * workspace_scale) for c in program.calls]
    items += [Item(f"ws{i}", w, i, i) for i, w in enumerate(workspace) if w]
    offsets = place(items)
    arena = max((offsets[i.name] + i.size for i in items), default=0)
    live = [sum(i.size for i in items if i.start <= c <= i.end) for c in range(len(program.calls))]
    tensor = {a: offsets[v] + program.tensors[a].offset for a, v in of.items()}
    return Plan(-(-arena // ALIGN) * ALIGN, offsets, items, live, workspace, tensor,
                sum(program.buffers) + max(workspace, default=0))


def check(plan: Plan) -> None:
    """LoweringError unless the plan is sound: no two items that are live at once share a byte,
    and every item lies inside the arena."""
    for a in plan.items:
        if plan.offsets[a.name] + a.size > plan.arena_bytes:
            raise LoweringError(f"arena plan: {a} ends past the arena of {plan.arena_bytes} bytes")
        for b in plan.items:
            if a.name < b.name and a.start <= b.end and b.start <= a.end:
                oa, ob = plan.offsets[a.name], plan.offsets[b.name]
                if not (oa + a.size <= ob or ob + b.size <= oa):
                    raise LoweringError(f"arena plan: {a} and {b} overlap in the arena")
