"""Mixed precision: sensitivity, hardware profiles, ILP allocation vs brute force and baselines,
the `mixed` scheme end to end (save/load), infeasible budgets and foreign profiles."""

from __future__ import annotations

import copy
import itertools
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.mixed import MixedPrecisionConfig
from lowbit.analysis.footprint import model_size_bytes
from lowbit.config import build_config, config_from_json, config_to_json
from lowbit.errors import ConfigError
from lowbit.mixed.allocate import (AllocationProblem, InfeasibleBudget, build_problem, greedy, pareto_front,
                                   solve_ilp, uniform)
from lowbit.mixed.profile import (CHOICES, HardwareProfile, ProfileMismatchWarning, layer_bytes, measure_layer,
                                  measure_switch, new_profile, predict_latency_us, profile_model)
from lowbit.mixed.sensitivity import group_units, hutchinson_traces, measure_sensitivity, OutputProbe


class Toy(nn.Module):
    """A 4-linear classifier with random weights (unit tests only)."""

    task = "classifier"
    model_name = "toy"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.l3, self.head = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.head(torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))))


@pytest.fixture(scope="module")
def toy_data():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 64, generator=g) for _ in range(2)]
    labels = [torch.randint(0, 16, (64,), generator=g) for _ in range(2)]
    return batches, labels


@pytest.fixture(scope="module")
def toy_report(toy_data):
    batches, labels = toy_data
    return measure_sensitivity(Toy(), batches, labels=labels, choices=("w2", "w4", "w8", "w8a8"),
                               hessian_samples=16, progress=False)


# ------------------------------------------------------------------------------ sensitivity

def test_group_units():
    names = ["m.layers.0.attn.q", "m.layers.0.attn.k", "m.layers.0.mlp.up", "m.layers.1.attn.q"]
    assert group_units(names, "layer") == {n: [n] for n in names}
    assert group_units(names, "parent") == {"m.layers.0.attn": names[:2], "m.layers.0.mlp": [names[2]],
                                            "m.layers.1.attn": [names[3]]}
    assert group_units(names, "block") == {"m.layers.0": names[:3], "m.layers.1": [names[3]]}
    with pytest.raises(ConfigError, match="group_by"):
        group_units(names, "head")


def test_sensitivity_is_ordered_by_bits(toy_report):
    assert set(toy_report.units) == {"l1", "l2", "l3", "head"}
    for u, e in toy_report.units.items():
        d = {c: e["choices"][c]["drift"] for c in ("w2", "w4", "w8")}
        assert d["w2"] > d["w4"] > d["w8"] >= 0, (u, d)
        s = {c: e["choices"][c]["sqnr_db"] for c in ("w2", "w4", "w8")}
        assert s["w2"] < s["w4"] < s["w8"], (u, s)
        assert e["hessian_trace"] > 0  # ReLU net + CE: H = J^T H_CE J is PSD, so every trace is positive
        assert e["choices"]["w4"]["hawq"] > e["choices"]["w8"]["hawq"] > 0
        assert e["choices"]["w4"]["bytes"] == layer_bytes(*e["shapes"][0], True, "w4")
    ranked = toy_report.ranked("w2")
    assert ranked[0][1]["choices"]["w2"]["drift"] >= ranked[-1][1]["choices"]["w2"]["drift"]


def test_sensitivity_restores_the_model(toy_data):
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_sensitivity(model, toy_data[0], choices=("w4",), hessian_samples=0, progress=False)
    assert all(isinstance(m, nn.Linear) for m in (model.l1, model.l2, model.l3, model.head))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hutchinson_matches_exact_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 5))
    model.task = "classifier"
    x, y = torch.randn(32, 4), torch.randint(0, 5, (32,))
    probe = OutputProbe(model, [x], labels=[y])
    w = model[0].weight
    est = hutchinson_traces(probe, {"0": w}, samples=400)["0"]

    def loss_of(wf):
        h = torch.tanh(nn.functional.linear(x, wf, model[0].bias))
        return nn.functional.cross_entropy(model[2](h), y)

    exact = float(torch.autograd.functional.hessian(loss_of, w.detach()).reshape(12, 12).trace())
    assert est == pytest.approx(exact, rel=0.15)


# ------------------------------------------------------------------------------ profile

def test_layer_bytes_are_exact():
    lin = nn.Linear(128, 64)
    for name, c in CHOICES.items():
        assert layer_bytes(128, 64, True, name) == model_size_bytes(c.build(lin))
    assert layer_bytes(128, 64, True, "w4") < layer_bytes(128, 64, True, "w8") < layer_bytes(128, 64, True, "fp32")


def test_alignment_rules():
    assert CHOICES["w4"].fits(128, 64) and not CHOICES["w4"].fits(96, 64) and not CHOICES["w4"].fits(64, 10)
    assert CHOICES["w8"].fits(64, 10) and CHOICES["fp32"].fits(7, 3)


def test_profile_roundtrip_and_foreign_machine_warning(tmp_path):
    p = new_profile(("w4", "w8", "fp32"))
    row = measure_layer(p, 64, 32, 8, repeats=3)
    assert set(row) == {"w4", "w8", "fp32"} and all(v["median"] > 0 and v["q1"] <= v["q3"] for v in row.values())
    sw = measure_switch(p, 64, 8, repeats=3)
    assert sw["w4->w4"] == 0.0 and "noise_us" in sw
    path = p.save(tmp_path / "p.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = HardwareProfile.load(path)  # same machine: no warning
    assert q.layer_latency(64, 32, 8, "w4") == pytest.approx(row["w4"]["median"])
    d = json.loads(path.read_text())
    d["machine"]["cpu"] = "Some Other CPU 9000"
    d["machine"]["cores"] = 128
    with pytest.warns(ProfileMismatchWarning, match="cpu: profile has 'Some Other CPU 9000'.*cores"):
        HardwareProfile.from_json(d)
    with pytest.raises(ConfigError, match="no latency for 1x1@1"):
        q.layer_latency(1, 1, 1, "w4")
    with pytest.raises(ConfigError, match="version"):
        HardwareProfile.from_json({"version": 99})


def test_profile_model_predicts_fp32_forward(digits_cnn):
    p = profile_model(digits_cnn, new_profile(("w8", "fp32")), repeats=3, switch=False)
    info = p.models["digits"]
    assert info["tokens"] == 450 and info["n_layers"] == 1
    pred = predict_latency_us(p, "digits", {"fc": digits_cnn.fc}, {})
    assert pred == pytest.approx(max(info["fp32_forward_us"]["median"], info["linear_fp32_us"]))


# ------------------------------------------------------------------------------ ILP

def _random_problem(seed: int, U: int = 5, switch: bool = False) -> AllocationProblem:
    rng = np.random.default_rng(seed)
    choices = ["w2", "w4", "w8", "fp32"]
    params = rng.integers(1000, 50000, U)
    bits = np.array([2.2, 4.3, 8.1, 32.0])
    size = params[:, None] * bits[None, :] / 8
    base = rng.lognormal(0, 1.5, U)
    loss = base[:, None] * np.array([16.0, 1.0, 1 / 16, 0.0])[None, :] * rng.uniform(0.5, 2, (U, 4))
    loss[:, 3] = 0
    loss[rng.integers(0, U), 0] = np.nan  # one unit cannot take w2 (alignment)
    lat = params[:, None] * rng.uniform(0.5, 1.5, (U, 4)) / 1e3
    sw = rng.uniform(0, 30, (4, 4)) * (1 - np.eye(4)) if switch else None
    return AllocationProblem([f"u{i}" for i in range(U)], choices, loss, size, lat, 1e5, 2e3, sw)


def _brute(p: AllocationProblem, key, feasible):
    best = None
    allowed = [[c for j, c in enumerate(p.choices) if p.allowed[i, j]] for i in range(len(p.units))]
    for combo in itertools.product(*allowed):
        a = p.evaluate(dict(zip(p.units, combo)))
        if feasible(a) and (best is None or key(a) < key(best) - 1e-12):
            best = a
    return best


@pytest.mark.parametrize("seed", range(4))
def test_ilp_size_budget_matches_brute_force(seed):
    p = _random_problem(seed)
    budget = (p.fixed_size + np.nanmean(np.where(p.allowed, p.size, np.nan), axis=1).sum() * 0.4) / 1e6
    ilp = solve_ilp(p, "loss", max_size_mb=budget)
    ref = _brute(p, lambda a: a.loss, lambda a: a.size_mb <= budget)
    assert ilp.size_mb <= budget + 1e-9
    assert ilp.loss == pytest.approx(ref.loss, rel=1e-6, abs=1e-12)
    g = greedy(p, budget)
    assert g.size_mb <= budget + 1e-9 and ilp.loss <= g.loss + 1e-12
    for c in ("w2", "w4", "w8"):
        u = uniform(p, c)
        if u.size_mb <= budget:
            assert ilp.loss <= u.loss + 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_ilp_latency_with_switch_costs_matches_brute_force(seed):
    p = _random_problem(seed, U=5, switch=True)
    threshold = float(np.nanmedian(p.loss[:, 1])) * 2
    ilp = solve_ilp(p, "latency", max_loss=threshold)
    ref = _brute(p, lambda a: a.latency_us, lambda a: a.loss <= threshold)
    assert ilp.loss <= threshold * (1 + 1e-9)
    assert ilp.latency_us == pytest.approx(ref.latency_us, rel=1e-6)


def test_infeasible_budget_names_the_smallest_feasible_budget():
    p = _random_problem(0)
    smallest = (p.fixed_size + np.where(p.allowed, p.size, np.inf).min(axis=1).sum()) / 1e6
    with pytest.raises(InfeasibleBudget, match=rf"smallest feasible is {smallest:.3f} MB"):
        solve_ilp(p, "loss", max_size_mb=smallest * 0.9)
    assert solve_ilp(p, "loss", max_size_mb=smallest + 1e-6).size_mb <= smallest + 1e-6
    with pytest.raises(InfeasibleBudget, match=rf"smallest feasible is {smallest:.3f} MB"):
        greedy(p, smallest * 0.9)
    with pytest.raises(InfeasibleBudget, match="latency bound .* smallest feasible is"):
        solve_ilp(p, "loss", max_latency_ms=1e-3)


def test_pareto_front_is_monotone():
    p = _random_problem(3, U=6)
    lo, hi = p.evaluate({u: "w2" if p.allowed[i, 0] else "w4" for i, u in enumerate(p.units)}).size_mb, \
        uniform(p, "fp32").size_mb
    front = pareto_front(p, list(np.linspace(lo * 0.8, hi, 12)))
    assert len(front) >= 3
    for a, b in zip(front, front[1:]):
        assert a.size_bytes <= b.size_bytes and a.loss > b.loss


# ------------------------------------------------------------------------------ the scheme

def test_scheme_and_config_roundtrip():
    cfg = build_config("mixed", {"budget_mb": 12.5})
    assert isinstance(cfg, MixedPrecisionConfig) and cfg.budget_mb == 12.5 and cfg.scheme == "mixed"
    with pytest.raises(ConfigError, match="needs a bound"):
        build_config("mixed", {})
    with pytest.raises(ConfigError, match="does not take bits"):
        build_config("mixed", {"bits": 4, "budget_mb": 3})
    c2 = MixedPrecisionConfig(assignment=(("a", "w4"), ("b", "w8")))
    assert config_from_json(json.loads(json.dumps(config_to_json(c2)))) == c2
    with pytest.raises(ConfigError, match="unknown precision choice"):
        MixedPrecisionConfig(assignment=(("a", "w5"),))


def test_mixed_handler_meets_budget(toy_data):
    batches, _ = toy_data
    model = Toy()
    fp32 = model_size_bytes(model)
    budget = fp32 * 0.25 / 1e6
    lowbit.quantize(model, MixedPrecisionConfig(budget_mb=budget, choices=("w2", "w4", "w8", "fp32")), batches)
    assert model_size_bytes(model) <= budget * 1e6
    extra = model.lowbit_report.extra
    assert set(extra["assignment"]) == {"l1", "l2", "l3", "head"}
    assert extra["allocation"]["size_bytes"] == model_size_bytes(model)
    with pytest.raises(InfeasibleBudget, match="smallest feasible"):
        lowbit.quantize(Toy(), MixedPrecisionConfig(budget_mb=fp32 * 0.01 / 1e6), batches)


def test_mixed_assignment_saves_and_loads(minilm, tmp_path):
    model = copy.deepcopy(minilm)
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    plan = {layers[0]: "w4", layers[1]: "w8", layers[2]: "w8a8", layers[3]: "w2", layers[4]: "w3"}
    lowbit.quantize(model, MixedPrecisionConfig(assignment=tuple(plan.items())))
    assert model.lowbit_report.layers[layers[0]]["fmt"] == "int4"
    assert model.lowbit_report.layers[layers[2]]["class"] == "DynamicQLinear"
    assert isinstance(model.get_submodule(layers[5]), nn.Linear)
    lowbit.save(model, tmp_path / "m")
    back = lowbit.load(tmp_path / "m")
    s = ["A short sentence to embed.", "Another one, a little longer than the first."]
    assert torch.allclose(model.encode(s), back.encode(s), atol=1e-6)
    with pytest.raises(ConfigError, match="not allocatable"):
        lowbit.quantize(copy.deepcopy(minilm), MixedPrecisionConfig(assignment=(("nope", "w4"),)))


def test_build_problem_from_report(toy_report):
    model = Toy()
    p = build_problem(model, toy_report)
    assert p.choices == ["w2", "w4", "w8", "w8a8", "fp32"]
    assert p.evaluate({u: "fp32" for u in p.units}).size_bytes == model_size_bytes(model)
    assert np.isnan(p.loss[p.units.index("head"), 0]) is np.False_  # 64 -> 16 fits the int4 kernel
    with pytest.raises(ConfigError, match="hardware profile"):
        solve_ilp(p, "latency", max_loss=1.0)


# ------------------------------------------------------------------------------ adaptive precision

def test_dual_linear_paths_equal_fixed_modules():
    from lowbit.mixed.adaptive import DualQLinear, make_adaptive, set_mode
    from lowbit.nn import WeightOnlyQLinear

    torch.manual_seed(0)
    lin, x = nn.Linear(128, 64), torch.randn(5, 128)
    dual = DualQLinear.from_float(lin)
    w4, w8 = WeightOnlyQLinear.from_float(lin, 4, 64), WeightOnlyQLinear.from_float(lin, 8, 0)
    with torch.inference_mode():
        assert torch.equal(dual(x), w4(x))
        dual.mode = "accurate"
        assert torch.equal(dual(x), w8(x))
    model = make_adaptive(Toy())
    assert model.lowbit_mode == "fast" and isinstance(model.l1, DualQLinear)
    set_mode(model, "accurate")
    assert model.l2.mode == "accurate"
    with pytest.raises(ConfigError, match="mode must be one of"):
        set_mode(model, "turbo")


def test_router_picks_the_feature_that_ranks_the_error():
    from lowbit.mixed.adaptive import ComplexityRouter

    rng = np.random.default_rng(0)
    err = rng.lognormal(size=200)
    feats = {"noise": rng.normal(size=200), "useful": -np.log(err) + 0.1 * rng.normal(size=200)}
    r = ComplexityRouter.fit(feats, err, 0.25)
    assert r.feature == "useful" and r.sign == -1.0 and r.spearman < -0.9
    assert r.hard(feats).mean() == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ConfigError, match="fraction"):
        ComplexityRouter.fit(feats, err, 1.5)


def test_adaptive_encode_routes_per_sentence(minilm):
    from lowbit.mixed.adaptive import ComplexityRouter, adaptive_encode, make_adaptive, set_mode

    model = make_adaptive(copy.deepcopy(minilm))
    s = ["Short one.", "A considerably longer sentence with many more words in it than the first.", "Mid size here."]
    router = ComplexityRouter("n_tokens", threshold=8)
    emb, hard = adaptive_encode(model, s, router)
    assert hard.tolist() == [False, True, False]
    set_mode(model, "accurate")
    acc = model.encode(s)
    set_mode(model, "fast")
    fast = model.encode(s)
    # equal up to the bf16 kernels' dependence on the batch shape (padding differs per sub-batch)
    assert torch.allclose(emb[1], acc[1], atol=1e-3) and torch.allclose(emb[0], fast[0], atol=1e-3)
    assert (emb[0] - fast[0]).abs().max() < (emb[0] - acc[0]).abs().max()
