"""Mixed precision under a size or latency budget (MISSION E.14-16): one precision choice per layer.

The handler measures per-layer sensitivity on calibration data (``lowbit.mixed.sensitivity``,
cached), builds the allocation problem with exact sizes and, when a latency bound or objective is
involved, the measured latencies of a hardware profile (``lowbit.mixed.profile``; measured now for
this model if none is given), solves it exactly (``lowbit.mixed.allocate.solve_ilp``) and swaps each
layer for the existing quantized module of its choice (``WeightOnlyQLinear`` w2/w3/w4/w8,
``DynamicQLinear`` w8a8, or ``nn.Linear`` kept fp32), so ``lowbit.save`` / ``lowbit.load`` work
unchanged. An explicit ``assignment`` (layer -> choice) skips the solver.

- ``budget_mb``: ``min drift s.t. size <= budget_mb`` (plus ``latency <= max_latency_ms`` if given);
- ``max_latency_ms`` alone: ``min drift s.t. predicted latency <= max_latency_ms``;
- ``max_loss`` alone: ``min latency s.t. drift <= max_loss`` (the second seed formulation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from lowbit.api import QuantizeReport, register_handler, set_submodule
from lowbit.config import BaseConfig, register_config, register_scheme
from lowbit.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CHOICES = ("w2", "w3", "w4", "w8", "w8a8", "fp32")


@register_config("mixed")
@dataclass(frozen=True)
class MixedPrecisionConfig(BaseConfig):
    budget_mb: float | None = None  # whole-model size bound (MB = 1e6 bytes)
    max_latency_ms: float | None = None  # predicted forward latency bound on the profiled workload
    max_loss: float | None = None  # drift bound for the latency-minimising formulation
    choices: tuple[str, ...] = DEFAULT_CHOICES
    group_by: str = "layer"  # layer | parent | block (see lowbit.mixed.sensitivity)
    assignment: tuple[tuple[str, str], ...] = ()  # explicit (layer, choice) pairs: no solver
    profile: str | None = None  # hardware profile JSON; None = this machine's `lowbit profile` output, else measured now
    n_calib: int | None = None  # calibration samples for sensitivity (None = a small default)
    max_tokens: int | None = 256  # LM calibration windows cut to this many tokens
    kernel: str = "auto"

    def __post_init__(self):
        from lowbit.mixed.profile import get_choice
        from lowbit.mixed.sensitivity import GROUP_BY

        for c in self.choices:
            get_choice(c)
        object.__setattr__(self, "assignment", tuple(tuple(p) for p in self.assignment))  # JSON gives lists
        object.__setattr__(self, "choices", tuple(self.choices))
        for pair in self.assignment:
            if len(pair) != 2:
                raise ConfigError(f"assignment entries are (layer, choice) pairs, got {pair!r}")
            get_choice(pair[1])
        if self.group_by not in GROUP_BY:
            raise ConfigError(f"group_by must be one of {GROUP_BY}, got {self.group_by!r}")
        for name in ("budget_mb", "max_latency_ms", "max_loss"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name} must be positive, got {v}")
        if not self.assignment and self.budget_mb is None and self.max_latency_ms is None and self.max_loss is None:
            raise ConfigError("mixed precision needs a bound: budget_mb (--budget-mb), max_latency_ms "
                              "(--max-latency-ms) or max_loss, or an explicit assignment")

    @property
    def scheme(self) -> str:
        return "mixed"


def _objective(config: MixedPrecisionConfig) -> tuple[str, dict]:
    bounds = dict(max_size_mb=config.budget_mb, max_latency_ms=config.max_latency_ms, max_loss=config.max_loss)
    if config.max_loss is not None and config.budget_mb is None and config.max_latency_ms is None:
        return "latency", bounds
    return "loss", bounds


def plan(model: nn.Module, config: MixedPrecisionConfig, calibration_data=None):
    """Solve the allocation for ``model`` under ``config``: (layer -> choice, Allocation, problem)."""
    from lowbit.mixed.allocate import build_problem, solve_ilp
    from lowbit.mixed.profile import HardwareProfile, default_profile_path, profile_model
    from lowbit.mixed.sensitivity import cached_sensitivity, measure_sensitivity

    sens_choices = tuple(c for c in config.choices if c != "fp32")
    kwargs = dict(choices=sens_choices, group_by=config.group_by, include=config.include, exclude=config.exclude,
                  max_tokens=config.max_tokens, hessian_samples=0)
    if calibration_data is not None:
        report = measure_sensitivity(model, list(calibration_data), **kwargs)
    else:
        n = config.n_calib or {"causal-lm": 2, "encoder": 64}.get(getattr(model, "task", None))
        report = cached_sensitivity(model, n_calib=n, **kwargs)
    objective, bounds = _objective(config)
    profile = None
    if objective == "latency" or config.max_latency_ms is not None:
        if config.profile:
            profile = HardwareProfile.load(config.profile)
        elif default_profile_path().is_file():  # written by `lowbit profile` on this machine
            profile = HardwareProfile.load(default_profile_path())
        if profile is None or getattr(model, "model_name", None) not in profile.models:
            log.info("measuring a hardware profile for this model (pass profile= to reuse one)")
            profile = profile_model(model, profile)
    problem = build_problem(model, report, profile, config.choices, config.include, config.exclude)
    alloc = solve_ilp(problem, objective, **bounds)
    return problem.layer_assignment(alloc.assignment), alloc, problem


@register_handler(MixedPrecisionConfig)
def _quantize_mixed(model: nn.Module, config: MixedPrecisionConfig, calibration_data=None):
    from lowbit.mixed.profile import get_choice, linear_layers

    layers = linear_layers(model, config.include, config.exclude)
    extra = {}
    if config.assignment:
        assignment = dict(config.assignment)
        unknown = [n for n in assignment if n not in layers]
        if unknown:
            raise ConfigError(f"assignment names layers that are not allocatable linears: {unknown[:3]} "
                              f"(e.g. valid: {list(layers)[:3]})")
    else:
        assignment, alloc, _ = plan(model, config, calibration_data)
        extra = {"allocation": {k: v for k, v in alloc.to_json().items() if k != "assignment"}}
    report = QuantizeReport(extra={**extra, "assignment": dict(assignment)})
    for name, m in layers.items():
        choice = get_choice(assignment.get(name, "fp32"))
        if not choice.fits(m.in_features, m.out_features):
            raise ConfigError(f"{name} ({m.in_features}->{m.out_features}) cannot run at {choice.name}: needs "
                              f"in_features % {choice.in_multiple} == 0 and out_features % {choice.out_multiple} == 0")
        if choice.name == "fp32":
            report.skipped[name] = "fp32 by the mixed-precision allocation"
            continue
        q = choice.build(m, config.kernel)
        set_submodule(model, name, q)
        report.layers[name] = q.spec()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name and name not in layers and name not in report.skipped:
            report.skipped[name] = "tied to the embedding table or excluded: left in fp32"
    return report


@register_scheme("mixed", "per-layer precision (w2/w3/w4/w8/w8a8/fp32) by an exact ILP over measured sensitivity: "
                 "--budget-mb X (size) and/or --max-latency-ms Y (measured-latency profile)",
                 options=("budget_mb", "max_latency_ms", "kernel"))
def _scheme(options: dict) -> MixedPrecisionConfig:
    def num(k):
        return None if options.get(k) is None else float(options[k])

    return MixedPrecisionConfig(budget_mb=num("budget_mb"), max_latency_ms=num("max_latency_ms"),
                                kernel=options.get("kernel", "auto"))
