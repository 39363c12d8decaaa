"""Bit allocation (MISSION E.15): pick one precision choice per unit (layer or group of layers).

With ``x[u, c] in {0, 1}``, ``sum_c x[u, c] = 1`` for every unit ``u``, additive per-unit costs from
the sensitivity report (``loss``, the drift of that unit alone at ``c``), exact sizes and measured
latencies from the hardware profile, the two seed formulations are integer linear programs solved
exactly by ``scipy.optimize.milp`` (HiGHS branch and bound):

- size-constrained:    ``min sum loss[u,c] x[u,c]  s.t.  S0 + sum size[u,c] x[u,c] <= budget``
- latency-oriented:    ``min T0 + sum lat[u,c] x[u,c] + sum sw[a,b] y[u,a,b]  s.t.  sum loss x <= threshold``

and any mix (:func:`solve_ilp` takes an objective and optional bounds on the other quantities).
Switching costs between consecutive units are linearised with ``y[u,a,b] >= x[u,a] + x[u+1,b] - 1``,
``0 <= y <= 1`` (exact for binary x since ``sw >= 0`` and y only appears with positive weight).
The additive model (total drift = sum of per-unit drifts; HAWQ-v3 makes the same assumption) is
what the benchmark checks against measured results.

Baselines: :func:`uniform` (every unit at one choice) and :func:`greedy`, the sensitivity-ranking
heuristic: start every unit at its smallest choice, then, from the most to the least sensitive unit
(drift at its smallest choice), give each the lowest-drift choice that still fits the budget.

An infeasible bound raises :class:`InfeasibleBudget`, whose message states the smallest feasible
value of that bound given the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from lowbit.errors import ConfigError

log = logging.getLogger(__name__)

MB = 1e6
QUANTITIES = ("loss", "size", "latency")


class InfeasibleBudget(ConfigError):
    """No allocation satisfies the bounds; the message gives the smallest feasible value."""


@dataclass
class AllocationProblem:
    units: list[str]
    choices: list[str]
    loss: np.ndarray  # (U, C) drift of unit u alone at choice c; nan = choice not allowed
    size: np.ndarray  # (U, C) exact bytes
    latency: np.ndarray | None = None  # (U, C) µs on the profiled workload
    fixed_size: float = 0.0  # bytes outside the units (embeddings, norms, tied head)
    fixed_latency: float = 0.0  # µs outside the units (attention, norms, head)
    switch: np.ndarray | None = None  # (C, C) µs between consecutive units, >= 0
    members: dict[str, list[str]] = field(default_factory=dict)  # unit -> layer names

    @property
    def allowed(self) -> np.ndarray:
        return ~np.isnan(self.loss)

    def index(self, choice: str) -> int:
        try:
            return self.choices.index(choice)
        except ValueError:
            raise ConfigError(f"choice {choice!r} not in this problem; choices: {', '.join(self.choices)}") from None

    def evaluate(self, assignment: dict[str, str], method: str = "manual") -> "Allocation":
        """Predicted size, drift and latency of an assignment (unit -> choice)."""
        idx = [self.index(assignment[u]) for u in self.units]
        rows = np.arange(len(self.units))
        if not self.allowed[rows, idx].all():
            bad = [u for u, i in zip(self.units, idx) if not self.allowed[self.units.index(u), i]]
            raise ConfigError(f"choice not allowed (alignment) for {bad[:3]}")
        lat = None
        if self.latency is not None:
            lat = self.fixed_latency + float(self.latency[rows, idx].sum())
            if self.switch is not None:
                lat += float(sum(self.switch[a, b] for a, b in zip(idx, idx[1:])))
        return Allocation(method, dict(assignment), self.fixed_size + float(self.size[rows, idx].sum()),
                          float(self.loss[rows, idx].sum()), lat)

    def layer_assignment(self, assignment: dict[str, str]) -> dict[str, str]:
        """Unit -> choice expanded to layer -> choice."""
        return {n: assignment[u] for u in self.units for n in self.members.get(u, [u])}


@dataclass
class Allocation:
    method: str
    assignment: dict[str, str]  # unit -> choice
    size_bytes: float
    loss: float  # predicted drift (sum over units)
    latency_us: float | None = None

    @property
    def size_mb(self) -> float:
        return self.size_bytes / MB

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.assignment.values():
            out[c] = out.get(c, 0) + 1
        return out

    def to_json(self) -> dict:
        return {"method": self.method, "size_bytes": self.size_bytes, "loss": self.loss,
                "latency_us": self.latency_us, "counts": self.counts(), "assignment": self.assignment}


# ------------------------------------------------------------------------------ building a problem

def build_problem(model: nn.Module, report, profile=None, choices: tuple[str, ...] | None = None,
                  include=("*",), exclude=()) -> AllocationProblem:
    """An allocation problem for ``model`` from a :class:`SensitivityReport` and optional hardware profile.

    ``choices`` default to the report's plus ``fp32`` (drift 0), restricted to the profile's supported ones.
    """
    from lowbit.analysis.footprint import model_size_bytes
    from lowbit.mixed.profile import get_choice, layer_bytes, linear_layers

    layers = linear_layers(model, include, exclude)
    choices = list(choices or [*report.choices, "fp32"])
    if profile is not None:
        unsupported = [c for c in choices if c not in profile.supported]
        if unsupported:
            log.info("choices %s not in the hardware profile: dropped", unsupported)
        choices = [c for c in choices if c in profile.supported]
    missing = [c for c in choices if c != "fp32" and c not in report.choices]
    if missing:
        raise ConfigError(f"sensitivity report has no measurement for {missing}; measured: {report.choices}")
    units = [u for u in report.units if all(n in layers for n in report.units[u]["layers"])]
    if not units:
        raise ConfigError("the sensitivity report's layers are not in this model (was it measured on another one?)")
    U, C = len(units), len(choices)
    loss, size = np.full((U, C), np.nan), np.zeros((U, C))
    lat = np.zeros((U, C)) if profile is not None else None
    tokens = None
    if profile is not None:
        name = getattr(model, "model_name", type(model).__name__)
        if name not in profile.models:
            raise ConfigError(f"hardware profile has no workload for {name!r} (profiled: "
                              f"{', '.join(profile.models) or 'none'}); run `lowbit profile --model {name}`")
        tokens = profile.models[name]["tokens"]
    members = {}
    for i, u in enumerate(units):
        entry = report.units[u]
        members[u] = list(entry["layers"])
        mods = [layers[n] for n in members[u]]
        for j, c in enumerate(choices):
            ch = get_choice(c)
            if not all(ch.fits(m.in_features, m.out_features) for m in mods):
                continue
            if c == "fp32":
                loss[i, j] = 0.0
            else:
                row = entry["choices"].get(c, {})
                if not row.get("allowed"):
                    continue
                loss[i, j] = float(row["drift"])
            size[i, j] = sum(layer_bytes(m.in_features, m.out_features, m.bias is not None, c) for m in mods)
            if lat is not None:
                lat[i, j] = sum(profile.layer_latency(m.in_features, m.out_features, tokens, c) for m in mods)
    in_units = {n for u in units for n in members[u]}
    fp32_bytes = sum(layer_bytes(m.in_features, m.out_features, m.bias is not None, "fp32")
                     for n, m in layers.items() if n in in_units)
    fixed_size = model_size_bytes(model) - fp32_bytes
    fixed_lat, switch = 0.0, None
    if profile is not None:
        info = profile.models[getattr(model, "model_name", type(model).__name__)]
        others = sum(profile.layer_latency(m.in_features, m.out_features, tokens, "fp32")
                     for n, m in layers.items() if n not in in_units)
        fixed_lat = info["rest_us"] + others
        switch = np.array([[profile.switch_cost(tokens, a, b) for b in choices] for a in choices])
        if not switch.any():
            switch = None
    return AllocationProblem(units, choices, loss, size, lat, fixed_size, fixed_lat, switch, members)


# ------------------------------------------------------------------------------ ILP

def _value_vector(p: AllocationProblem, q: str) -> np.ndarray:
    if q == "loss":
        return np.nan_to_num(p.loss, nan=0.0).ravel()
    if q == "size":
        return p.size.ravel() / MB
    if q == "latency":
        if p.latency is None:
            raise ConfigError("a latency objective or bound needs a hardware profile (see `lowbit profile`)")
        return p.latency.ravel() / 1e3  # ms
    raise ConfigError(f"unknown quantity {q!r}; valid: {', '.join(QUANTITIES)}")


def _offset(p: AllocationProblem, q: str) -> float:
    return {"loss": 0.0, "size": p.fixed_size / MB, "latency": p.fixed_latency / 1e3}[q]


def _solve(p: AllocationProblem, objective: str, bounds: dict[str, float]):
    """Raw milp call; bounds in MB / ms / drift. Returns (assignment or None, status message)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    U, C = len(p.units), len(p.choices)
    nx = U * C
    use_switch = p.switch is not None and ("latency" == objective or "latency" in bounds)
    pairs = []  # (u, a, b, cost ms)
    if use_switch:
        pairs = [(u, a, b, p.switch[a, b] / 1e3) for u in range(U - 1) for a in range(C) for b in range(C)
                 if p.switch[a, b] > 0]
    n = nx + len(pairs)
    rows, lo, hi = [], [], []

    def add(row, lower, upper):
        rows.append(row)
        lo.append(lower)
        hi.append(upper)

    for u in range(U):  # one choice per unit
        r = np.zeros(n)
        r[u * C:(u + 1) * C] = 1
        add(r, 1, 1)
    for k, (u, a, b, _) in enumerate(pairs):  # y >= x[u,a] + x[u+1,b] - 1
        r = np.zeros(n)
        r[nx + k] = 1
        r[u * C + a] -= 1
        r[(u + 1) * C + b] -= 1
        add(r, -1, np.inf)

    def vec(q):
        v = np.zeros(n)
        v[:nx] = _value_vector(p, q)
        if q == "latency":
            for k, (*_, cost) in enumerate(pairs):
                v[nx + k] = cost
        return v

    for q, bound in bounds.items():
        add(vec(q), -np.inf, bound - _offset(p, q))
    c = vec(objective)
    scale = np.abs(c).max() or 1.0
    c = c / scale
    # tie-break: among equal objective values prefer the smaller model, then the lower drift
    second = vec("size" if objective != "size" else "loss")
    c = c + 1e-7 * second / (np.abs(second).max() or 1.0)
    upper = np.ones(n)
    upper[:nx] = p.allowed.ravel().astype(float)
    integrality = np.r_[np.ones(nx), np.zeros(len(pairs))]
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(n), upper), options={"mip_rel_gap": 1e-6, "time_limit": 60})
    if res.x is None:
        return None, res.message
    x = res.x[:nx].reshape(U, C)
    return {u: p.choices[int(np.argmax(x[i]))] for i, u in enumerate(p.units)}, res.message


def _describe(q: str, v: float) -> str:
    return {"size": f"{v:.3f} MB", "latency": f"{v:.2f} ms", "loss": f"{v:.6g} drift"}[q]


def solve_ilp(p: AllocationProblem, objective: str = "loss", *, max_size_mb: float | None = None,
              max_latency_ms: float | None = None, max_loss: float | None = None) -> Allocation:
    """Minimise ``objective`` (loss | size | latency) subject to the given bounds, exactly."""
    bounds = {k: v for k, v in (("size", max_size_mb), ("latency", max_latency_ms), ("loss", max_loss))
              if v is not None}
    for q in (objective, *bounds):
        _value_vector(p, q)
    assignment, msg = _solve(p, objective, bounds)
    if assignment is None:
        raise _infeasible(p, bounds, msg)
    alloc = p.evaluate(assignment, "ilp")
    log.info("ILP (%s; %s): size %.3f MB, drift %.4g%s", objective, bounds, alloc.size_mb, alloc.loss,
             "" if alloc.latency_us is None else f", latency {alloc.latency_us / 1e3:.2f} ms")
    return alloc


def _infeasible(p: AllocationProblem, bounds: dict[str, float], msg: str) -> InfeasibleBudget:
    """For each bound, the smallest value that would be feasible with the other bounds kept."""
    parts = []
    for q, v in bounds.items():
        others = {k: b for k, b in bounds.items() if k != q}
        best, _ = _solve(p, q, others)
        if best is None:
            continue
        a = p.evaluate(best)
        least = {"size": a.size_mb, "latency": (a.latency_us or 0) / 1e3, "loss": a.loss}[q]
        parts.append(f"the {q} bound {_describe(q, v)} is infeasible: the smallest feasible is {_describe(q, least)}"
                     + (f" (with {', '.join(f'{k} <= {_describe(k, b)}' for k, b in others.items())})" if others else
                        f" ({_cheapest_note(a)})"))
    if not parts:
        parts.append(f"no allocation meets {bounds} together ({msg})")
    return InfeasibleBudget("; ".join(parts))


def _cheapest_note(a: Allocation) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(a.counts().items()))


# ------------------------------------------------------------------------------ baselines

def uniform(p: AllocationProblem, choice: str) -> Allocation:
    """Every unit at ``choice``; units whose shape does not allow it stay fp32 (alignment)."""
    j = p.index(choice)
    fallback = p.choices.index("fp32") if "fp32" in p.choices else None
    assignment = {}
    for i, u in enumerate(p.units):
        if p.allowed[i, j]:
            assignment[u] = choice
        elif fallback is not None:
            assignment[u] = "fp32"
        else:
            raise ConfigError(f"{u} cannot run at {choice} and fp32 is not a choice")
    a = p.evaluate(assignment, f"uniform-{choice}")
    return a


def greedy(p: AllocationProblem, max_size_mb: float) -> Allocation:
    """Sensitivity ranking: most sensitive units first get the lowest-drift choice that still fits."""
    budget = max_size_mb * MB - p.fixed_size
    size = np.where(p.allowed, p.size, np.inf)
    cheapest = size.argmin(axis=1)
    rows = np.arange(len(p.units))
    used = float(size[rows, cheapest].sum())
    if used > budget + 1e-6:
        raise InfeasibleBudget(f"the size bound {max_size_mb:.3f} MB is infeasible: the smallest feasible is "
                               f"{(used + p.fixed_size) / MB:.3f} MB")
    pick = cheapest.copy()
    score = p.loss[rows, cheapest]
    for i in np.argsort(-score, kind="stable"):
        for j in np.argsort(np.where(p.allowed[i], p.loss[i], np.inf), kind="stable"):
            if not p.allowed[i, j]:
                break
            extra = size[i, j] - size[i, pick[i]]
            if used + extra <= budget + 1e-6:
                used += extra
                pick[i] = j
                break
    return p.evaluate({u: p.choices[j] for u, j in zip(p.units, pick)}, "greedy")


def pareto_front(p: AllocationProblem, budgets_mb: list[float], objective: str = "loss") -> list[Allocation]:
    """ILP solutions over a sweep of size budgets (infeasible budgets skipped), non-dominated only."""
    sols = []
    for b in budgets_mb:
        try:
            sols.append(solve_ilp(p, objective, max_size_mb=b))
        except InfeasibleBudget:
            continue
    front, best = [], np.inf
    for a in sorted(sols, key=lambda a: (a.size_bytes, a.loss)):
        if a.loss < best - 1e-15:
            front.append(a)
            best = a.loss
    return front


__all__ = ["AllocationProblem", "Allocation", "InfeasibleBudget", "build_problem", "solve_ilp", "uniform",
           "greedy", "pareto_front"]
