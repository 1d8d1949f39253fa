"""The bit allocation of `hawq` as an integer program, and its Pareto frontier.

Units u (a layer, or layers that must share a width) each pick one width b from the candidate
list; x[u, b] in {0, 1}:

    minimize   sum_{u,b} S[u, b] x[u, b]          (S: HAWQ-V2 sensitivity, tr(H)/n ||Q_b(W) - W||^2)
    subject to sum_b x[u, b] = 1                  (one width per unit)
               sum_{u,b} C[u, b] x[u, b] <= budget (C: size, BOPs or measured latency)

solved exactly by branch and bound (`scipy.optimize.milp`, HiGHS). The smallest feasible
budget is sum_u min_b C[u, b]. The frontier sweeps budgets from that to sum_u max_b C[u, b]
and keeps the (cost, sensitivity) points that no other point beats in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Choice:
    """One assignment: the candidate index per unit, its total cost and sensitivity."""

    index: tuple[int, ...]
    cost: float
    sensitivity: float


def min_cost(cost: np.ndarray) -> float:
    return float(cost.min(axis=1).sum())


def max_cost(cost: np.ndarray) -> float:
    return float(cost.max(axis=1).sum())


def evaluate(index, sens: np.ndarray, cost: np.ndarray) -> Choice:
    rows = np.arange(len(index))
    idx = np.asarray(index)
    return Choice(tuple(int(i) for i in index), float(cost[rows, idx].sum()), float(sens[rows, idx].sum()))


def solve(sens: np.ndarray, cost: np.ndarray, budget: float) -> Choice | None:
    """The assignment of least total sensitivity with total cost <= budget (None if none)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    units, widths = sens.shape
    if budget < min_cost(cost) * (1 - 1e-12):
        return None
    one_hot = np.kron(np.eye(units), np.ones((1, widths)))
    scale = max(float(np.abs(sens).max()), 1e-300)  # HiGHS works best with objective values near 1
    res = milp(c=sens.ravel() / scale,
               constraints=[LinearConstraint(one_hot, 1, 1),
                            LinearConstraint(cost.ravel()[None, :], -np.inf, budget * (1 + 1e-9))],
               integrality=np.ones(units * widths), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0.0})
    if res.x is None:
        return None
    index = res.x.reshape(units, widths).argmax(axis=1)
    return evaluate(index, sens, cost)


def frontier(sens: np.ndarray, cost: np.ndarray, points: int = 16) -> list[Choice]:
    """Non-dominated (cost, sensitivity) assignments found by solving at `points` budgets
    spread evenly from the smallest to the largest total cost; sorted by cost."""
    lo, hi = min_cost(cost), max_cost(cost)
    found = {}
    for budget in np.linspace(lo, hi, max(points, 2)):
        c = solve(sens, cost, float(budget))
        if c is not None:
            found[c.index] = c
    out, best = [], np.inf
    for c in sorted(found.values(), key=lambda c: (c.cost, c.sensitivity)):
        if c.sensitivity < best:
            out.append(c)
            best = c.sensitivity
    return out
