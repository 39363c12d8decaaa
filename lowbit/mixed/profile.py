"""Hardware profiles: which precisions this machine runs, how fast each layer shape runs at each, and
what it costs to switch precision between adjacent layers (MISSION E.16).

A *choice* is one way to run a linear layer with lowbit's own modules (:data:`CHOICES`):

=======  ====  ================================================================================
choice   bits  module / kernel
=======  ====  ================================================================================
fp32     32    ``nn.Linear`` (``F.linear``, fp32 GEMM)
w8a8     8     ``DynamicQLinear``: int8 x int8 -> int32 (``torch._int_mm``), per-token activations
w8       8     ``WeightOnlyQLinear`` int8 per channel (``_weight_int8pack_mm``, bf16 activations)
w4/w3/w2 4/3/2 ``WeightOnlyQLinear`` int4/int3/int2 per group of 64 (``_weight_int4pack_mm_for_cpu``)
=======  ====  ================================================================================

A profile (JSON) records, for the machine it was measured on (:func:`machine_fingerprint`):

- ``latency_us["{in}x{out}@{tokens}"][choice]``: median / quartiles of the layer's forward time on a
  (tokens, in) input, micro-benchmarked with the real module;
- ``switch_us["@{tokens}"]["a->b"]``: ``t(b(a(x))) - t(a(x)) - t(b(x))`` at a square hidden shape;
- ``alignment[choice]``: the shape rules a layer must meet (``in_features % multiple == 0``);
- ``models[name]``: the model's fp32 forward on its fixed workload and the part of it spent outside
  the allocatable linears (``rest_us``), so that a model latency is predicted additively:
  ``T = rest + sum_l t_l(choice_l) + sum_(l, l+1) switch(choice_l, choice_l+1)``.

Timing clock: on this shared 2-core machine wall time is dominated by other processes, so profiles
are measured single-threaded with ``time.thread_time`` (CPU time of the measuring thread: what the
layer costs on an idle core) by default; ``clock="wall"`` uses ``perf_counter``. A profile loaded on
a different machine (CPU model, core count, torch version, thread count) gives a
:class:`ProfileMismatchWarning` naming each field that differs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lowbit.core.threads import torch_threads
from lowbit.errors import ConfigError

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
INT4_N = 16  # _convert_weight_to_int4pack_for_cpu needs out_features % 16 == 0
LOW_BIT_GROUP = 64  # divides 64 (digits), 384/1536 (MiniLM), 576/192/1536 (SmolLM2); an int4-kernel group size


@dataclass(frozen=True)
class Choice:
    name: str
    bits: int
    module: str  # the lowbit module that runs it
    kernel: str  # the op in lowbit.kernels.KERNELS (or "F.linear")
    in_multiple: int = 1  # alignment: in_features must be a multiple of this
    group_size: int = 0
    out_multiple: int = 1  # alignment: out_features must be a multiple of this

    def build(self, linear: nn.Linear, kernel: str = "auto") -> nn.Module:
        """The module running ``linear`` at this choice (``linear`` itself for fp32)."""
        from lowbit.nn import DynamicQLinear, WeightOnlyQLinear

        if self.name == "fp32":
            return linear
        if self.name == "w8a8":
            return DynamicQLinear.from_float(linear, kernel)
        return WeightOnlyQLinear.from_float(linear, self.bits, self.group_size, True, None, kernel)

    def fits(self, in_features: int, out_features: int) -> bool:
        return in_features % self.in_multiple == 0 and out_features % self.out_multiple == 0


CHOICES: dict[str, Choice] = {
    c.name: c
    for c in (
        Choice("w2", 2, "WeightOnlyQLinear", "int4_weight_only_linear", LOW_BIT_GROUP, LOW_BIT_GROUP, INT4_N),
        Choice("w3", 3, "WeightOnlyQLinear", "int4_weight_only_linear", LOW_BIT_GROUP, LOW_BIT_GROUP, INT4_N),
        Choice("w4", 4, "WeightOnlyQLinear", "int4_weight_only_linear", LOW_BIT_GROUP, LOW_BIT_GROUP, INT4_N),
        Choice("w8", 8, "WeightOnlyQLinear", "int8_weight_only_linear"),
        Choice("w8a8", 8, "DynamicQLinear", "int8_dynamic_linear"),
        Choice("fp32", 32, "nn.Linear", "F.linear"),
    )
}


def get_choice(name: str) -> Choice:
    try:
        return CHOICES[name]
    except KeyError:
        raise ConfigError(f"unknown precision choice {name!r}; valid: {', '.join(CHOICES)}") from None


# ------------------------------------------------------------------------------ exact sizes

_SIZE_CACHE: dict[tuple, int] = {}


def layer_bytes(in_features: int, out_features: int, bias: bool, choice: str) -> int:
    """Exact stored bytes of a linear of this shape at ``choice`` (codes + scales + bias), by building one."""
    from lowbit.analysis.footprint import model_size_bytes

    key = (in_features, out_features, bias, choice)
    if key not in _SIZE_CACHE:
        lin = nn.Linear(in_features, out_features, bias=bias)
        _SIZE_CACHE[key] = model_size_bytes(get_choice(choice).build(lin))
    return _SIZE_CACHE[key]


# ------------------------------------------------------------------------------ machine

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "asimd")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def machine_fingerprint(threads: int | None = None) -> dict:
    """What a latency table depends on: CPU model and ISA flags, core count, torch version, threads."""
    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "platform": platform.platform(terse=True),
    }


class ProfileMismatchWarning(UserWarning):
    """A hardware profile measured on another machine (or torch build) is being used here."""


MATCH_FIELDS = ("cpu", "cpu_flags", "cores", "torch")


def check_machine(profile: "HardwareProfile") -> list[str]:
    """Fields where the profile's machine differs from this one; warns once naming each of them."""
    here = machine_fingerprint(profile.threads)
    diff = [f"{k}: profile has {profile.machine.get(k)!r}, this machine has {here[k]!r}"
            for k in MATCH_FIELDS if profile.machine.get(k) != here[k]]
    if diff:
        msg = "hardware profile measured on a different machine; its latencies may not hold here (" + "; ".join(diff) + ")"
        warnings.warn(msg, ProfileMismatchWarning, stacklevel=3)
        log.warning(msg)
    return diff


# ------------------------------------------------------------------------------ timing

def time_us(fn: Callable[[], object], repeats: int = 15, warmup: int = 3, clock: str = "thread") -> dict:
    """Median and quartiles (µs) of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    tick = time.thread_time if clock == "thread" else time.perf_counter
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(max(3, repeats)):
        start = tick()
        fn()
        ts.append((tick() - start) * 1e6)
    q1, med, q3 = statistics.quantiles(ts, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3, "n": len(ts)}


def shape_key(in_features: int, out_features: int, tokens: int) -> str:
    return f"{in_features}x{out_features}@{tokens}"


# ------------------------------------------------------------------------------ the profile

@dataclass
class HardwareProfile:
    machine: dict
    threads: int = 1
    clock: str = "thread"
    choices: dict = field(default_factory=dict)  # name -> {bits, module, kernel, group_size}
    alignment: dict = field(default_factory=dict)  # name -> {"in_features_multiple": k}
    latency_us: dict = field(default_factory=dict)  # shape_key -> choice -> {median, q1, q3, n}
    switch_us: dict = field(default_factory=dict)  # "@tokens" -> "a->b" -> µs
    models: dict = field(default_factory=dict)  # model name -> {tokens, fp32_forward_us, rest_us, ...}
    version: int = PROFILE_VERSION

    @property
    def supported(self) -> list[str]:
        return list(self.choices)

    def layer_latency(self, in_features: int, out_features: int, tokens: int, choice: str) -> float:
        key = shape_key(in_features, out_features, tokens)
        try:
            return float(self.latency_us[key][choice]["median"])
        except KeyError:
            raise ConfigError(f"profile has no latency for {key} at {choice}; measured shapes: "
                              f"{', '.join(sorted(self.latency_us)) or 'none'} (run `lowbit profile --model ...`)") from None

    def switch_cost(self, tokens: int, a: str, b: str) -> float:
        """Measured switching cost a -> b, or 0 where it is within the measurement noise (or negative)."""
        table = self.switch_us.get(f"@{tokens}", {})
        cost = float(table.get(f"{a}->{b}", 0.0))
        return cost if cost > float(table.get("noise_us", 0.0)) else 0.0

    def to_json(self) -> dict:
        return {"version": self.version, "machine": self.machine, "threads": self.threads, "clock": self.clock,
                "choices": self.choices, "alignment": self.alignment, "latency_us": self.latency_us,
                "switch_us": self.switch_us, "models": self.models}

    def save(self, path: str | Path) -> Path:
        from lowbit.io.atomic import atomic_write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def from_json(cls, d: dict, check: bool = True) -> "HardwareProfile":
        if not isinstance(d, dict) or d.get("version") != PROFILE_VERSION:
            raise ConfigError(f"not a lowbit hardware profile of version {PROFILE_VERSION} "
                              f"(got version {d.get('version') if isinstance(d, dict) else type(d).__name__})")
        missing = [k for k in ("machine", "choices", "latency_us") if k not in d]
        if missing:
            raise ConfigError(f"hardware profile lacks {', '.join(missing)}")
        p = cls(**{k: d[k] for k in ("machine", "threads", "clock", "choices", "alignment", "latency_us",
                                     "switch_us", "models") if k in d})
        if check:
            check_machine(p)
        return p

    @classmethod
    def load(cls, path: str | Path, check: bool = True) -> "HardwareProfile":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read hardware profile {path}: {exc}") from None
        return cls.from_json(d, check)

    def merge(self, other: "HardwareProfile") -> None:
        for k, v in other.latency_us.items():
            self.latency_us.setdefault(k, {}).update(v)
        for k, v in other.switch_us.items():
            self.switch_us.setdefault(k, {}).update(v)
        self.models.update(other.models)


def new_profile(choices: tuple[str, ...] = tuple(CHOICES), threads: int = 1, clock: str = "thread") -> HardwareProfile:
    cs = [get_choice(c) for c in choices]
    return HardwareProfile(
        machine=machine_fingerprint(threads), threads=threads, clock=clock,
        choices={c.name: {"bits": c.bits, "module": c.module, "kernel": c.kernel, "group_size": c.group_size}
                 for c in cs},
        alignment={c.name: {"in_features_multiple": c.in_multiple, "out_features_multiple": c.out_multiple}
                   for c in cs},
    )


def default_profile_path() -> Path:
    """Where ``lowbit profile`` writes by default: the lowbit cache, keyed by this machine."""
    from lowbit.models._cache import cache_dir, recipe_key

    return cache_dir() / f"profile-{recipe_key(machine_fingerprint(1))}.json"


def measure_layer(profile: HardwareProfile, in_features: int, out_features: int, tokens: int,
                  repeats: int = 15, bias: bool = True) -> dict:
    """Micro-benchmark one layer shape at every choice of ``profile`` (fits only); stored and returned."""
    torch.manual_seed(0)
    lin = nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(tokens, in_features)  # (M, K)
    row = profile.latency_us.setdefault(shape_key(in_features, out_features, tokens), {})
    with torch_threads(profile.threads), torch.inference_mode():
        for name in profile.choices:
            c = get_choice(name)
            if not c.fits(in_features, out_features):
                continue
            m = c.build(lin)
            row[name] = time_us(lambda: m(x), repeats=repeats, clock=profile.clock)
    return row


def measure_switch(profile: HardwareProfile, hidden: int, tokens: int, repeats: int = 15) -> dict:
    """Switching cost between adjacent layers on square (hidden x hidden) layers:
    ``switch(a, b) = t(b∘a) - (t(a∘a) + t(b∘b)) / 2`` (0 for a == b by definition).

    The typical interquartile range of the chains is stored as ``noise_us``; :meth:`switch_cost`
    counts only costs above it.
    """
    torch.manual_seed(0)
    la, lb = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
    x = torch.randn(tokens, hidden)  # (M, H)
    names = [n for n in profile.choices if get_choice(n).fits(hidden, hidden)]
    out = profile.switch_us.setdefault(f"@{tokens}", {})
    chain, spreads = {}, []
    with torch_threads(profile.threads), torch.inference_mode():
        built = {n: (get_choice(n).build(la), get_choice(n).build(lb)) for n in names}
        for a in names:
            for b in names:
                ma, mb = built[a][0], built[b][1]
                t = time_us(lambda: mb(ma(x)), repeats, clock=profile.clock)
                chain[a, b] = t["median"]
                spreads.append(t["q3"] - t["q1"])
    for a in names:
        for b in names:
            out[f"{a}->{b}"] = 0.0 if a == b else chain[a, b] - (chain[a, a] + chain[b, b]) / 2
    out["noise_us"] = statistics.median(spreads)
    return out


# ------------------------------------------------------------------------------ models

def linear_layers(model: nn.Module, include=("*",), exclude=()) -> dict[str, nn.Linear]:
    """The allocatable linears of ``model`` in execution (module) order; tied weights (an LM head that
    shares the embedding table) are left out, since quantizing them would un-tie and duplicate it."""
    from lowbit.api import select_modules

    emb_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    return {n: m for n, m in select_modules(model, (nn.Linear,), include, exclude)
            if m.weight.data_ptr() not in emb_ptrs}


def model_workload(model: nn.Module) -> tuple[Callable[[], object], int, str]:
    """The fixed forward a model's latency is predicted and measured on: (run, tokens per linear, text)."""
    task = getattr(model, "task", None)
    if task == "encoder":
        from lowbit.data import eval_sentences

        feats = model.tokenize(eval_sentences(32))
        ids, mask = feats["input_ids"], feats["attention_mask"]  # (32, T)
        return (lambda: model(ids, mask)), ids.numel(), f"encoder forward, 32 eval sentences padded to {ids.shape[1]} tokens"
    if task == "causal-lm":
        from lowbit.analysis.evaluate import lm_windows
        from lowbit.data import lm_eval_text

        ids = lm_windows(model.tokenizer, lm_eval_text(), 512, max_windows=1)  # (1, 512)
        return (lambda: model(ids)), ids.numel(), "causal-LM prefill of one 512-token window"
    if task == "classifier":
        from lowbit.models.digits import digits_data

        x = digits_data()[2]  # (450, 1, 8, 8)
        return (lambda: model(x)), x.shape[0], "classifier forward on the 450 test images"
    raise ConfigError(f"model task {task!r} has no fixed workload; supported: encoder, causal-lm, classifier")


def measure_model_forward(model: nn.Module, threads: int = 1, clock: str = "thread", repeats: int = 7) -> dict:
    run, _, _ = model_workload(model)
    with torch_threads(threads), torch.inference_mode():
        return time_us(run, repeats=repeats, warmup=1, clock=clock)


def profile_model(model: nn.Module, profile: HardwareProfile | None = None, repeats: int = 15,
                  switch: bool = True) -> HardwareProfile:
    """Measure every allocatable linear shape of ``model`` at every choice on its workload, the switching
    costs at its hidden size, and its fp32 forward, from which ``rest_us`` (time outside the linears)."""
    profile = profile or new_profile()
    layers = linear_layers(model)
    _, tokens, what = model_workload(model)
    shapes = sorted({(m.in_features, m.out_features, m.bias is not None) for m in layers.values()})
    for k, n, b in shapes:
        log.info("profiling %dx%d at %d tokens", k, n, tokens)
        measure_layer(profile, k, n, tokens, repeats, bias=b)
    if switch:
        hidden = max((k for k, n, _ in shapes if k == n), default=shapes[0][0])
        measure_switch(profile, hidden, tokens, repeats)
    fwd = measure_model_forward(model, profile.threads, profile.clock)
    lin_sum = sum(profile.layer_latency(m.in_features, m.out_features, tokens, "fp32") for m in layers.values())
    name = getattr(model, "model_name", type(model).__name__)
    profile.models[name] = {"tokens": tokens, "workload": what, "fp32_forward_us": fwd,
                            "linear_fp32_us": lin_sum, "rest_us": max(0.0, fwd["median"] - lin_sum),
                            "n_layers": len(layers)}
    return profile


def predict_latency_us(profile: HardwareProfile, model_name: str, layers: dict[str, nn.Linear],
                       assignment: dict[str, str]) -> float:
    """``rest + sum_l t_l + sum switch(l, l+1)`` for a per-layer ``assignment`` (missing layers: fp32)."""
    info = profile.models.get(model_name)
    if info is None:
        raise ConfigError(f"profile has no workload for model {model_name!r}; profiled: {', '.join(profile.models) or 'none'}")
    tokens = info["tokens"]
    names = list(layers)
    total = info["rest_us"]
    for n in names:
        m = layers[n]
        total += profile.layer_latency(m.in_features, m.out_features, tokens, assignment.get(n, "fp32"))
    for a, b in zip(names, names[1:]):
        total += profile.switch_cost(tokens, assignment.get(a, "fp32"), assignment.get(b, "fp32"))
    return total
