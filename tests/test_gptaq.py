"""GPTAQ (asymmetric calibration) and GPTQ's RTN-fallback guard: GPTAQ is GPTQ bit for bit when the
float and quantized inputs agree, it lowers the asymmetric objective when they do not, and the guard
keeps RTN's codes for linears where GPTQ loses on held-out calibration windows, recorded in
metadata.json; also with the W/A presets' ``wrap``."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import lowbit
from lowbit.algorithms.gptq import GPTQ, GPTQConfig, make_gptq_process, rtn_solution
from lowbit.algorithms.gptq_ranks import check_ranks_support
from lowbit.algorithms.sequential import process_layerwise
from lowbit.api import QuantizeReport
from lowbit.config import build_config
from lowbit.core import dequantize
from lowbit.errors import CalibrationError, ConfigError
from lowbit.nn import WeightOnlyQLinear
from tests._tiny_llama import tiny_batches, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small ops, one thread

PREFIX = "lm.model.layers"


def _inputs(m: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) * torch.linspace(0.5, 3.0, k)


def _asym_err(w, q, x_fp, x_q) -> float:
    """The GPTAQ objective ||X_fp W^T - X_q Q^T||^2."""
    return float(((x_fp.double() @ w.double().T - x_q.double() @ q.double().T) ** 2).sum())


def test_gptaq_is_gptq_bit_for_bit_when_the_inputs_agree():
    x, w = _inputs(512, 64), torch.randn(32, 64)
    plain, asym = GPTQ(64), GPTQ(64)
    for chunk in x.split(128):
        plain.add_batch(chunk)
        asym.add_batch(chunk)
        asym.add_cross(chunk, chunk)  # dX = 0: P = 0, W* = W
    a, b = plain.solve(w, "int4", True, 16), asym.solve(w, "int4", True, 16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].scale, b[1].scale) and a[2] == b[2]


def test_gptaq_on_a_one_layer_llama_is_gptq_bit_for_bit():
    # layer 0 sees the embeddings in both streams, so X_fp == X_q for every linear
    fp, batches = tiny_llama(layers=1), tiny_batches(n=4, length=64)
    a = lowbit.quantize(copy.deepcopy(fp), GPTQConfig(bits=4, group_size=16), batches)
    b = lowbit.quantize(copy.deepcopy(fp), GPTQConfig(bits=4, group_size=16, asymmetric_calib=True), batches)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.lowbit_scheme == "gptaq-w4-g16-sym"


def test_gptaq_lowers_the_asymmetric_objective():
    # X_q = X_fp mixed by a near-identity map plus noise: the accumulated error GPTAQ is built for
    g = torch.Generator().manual_seed(3)
    k = 64
    mix = torch.eye(k) + 0.2 * torch.randn(k, k, generator=g) / math.sqrt(k)
    x_fp = _inputs(4096, k, seed=1)
    x_q = x_fp @ mix + 0.05 * torch.randn(4096, k, generator=g)
    w = torch.randn(32, k, generator=g)
    sols = {}
    for asym in (False, True):
        h = GPTQ(k)
        for a, b in zip(x_fp.split(512), x_q.split(512)):
            h.add_batch(b)
            if asym:
                h.add_cross(a, b)
        codes, qp, _ = h.solve(w, "int4", True, 16, percdamp=0.01)
        sols[asym] = dequantize(codes, qp)
    gptq, gptaq = (_asym_err(w, sols[a], x_fp, x_q) for a in (False, True))
    assert gptaq < 0.3 * gptq  # measured 0.17x
    x_fp2 = _inputs(2048, k, seed=2)  # fresh windows of the same distribution: it generalises
    x_q2 = x_fp2 @ mix + 0.05 * torch.randn(2048, k, generator=g)
    assert _asym_err(w, sols[True], x_fp2, x_q2) < 0.3 * _asym_err(w, sols[False], x_fp2, x_q2)


def test_rtn_solution_is_round_to_nearest():
    lin = torch.nn.Linear(64, 24)
    codes, qp = rtn_solution(lin.weight, "int4", True, 16)
    ref = WeightOnlyQLinear.from_float(lin, 4, 16, True)
    assert torch.equal(dequantize(codes, qp), ref.dequantized_weight())


def _guard_case():
    """Fit windows of one repeated token (a rank-deficient, narrow Hessian GPTQ overfits) and random
    held-out windows: GPTQ loses to RTN on the held-out windows for some linears."""
    fit = [torch.full((1, 64), t) for t in (5, 5, 7, 7)]
    held = tiny_batches(n=2, length=64, seed=4)
    return tiny_llama(layers=2), fit + held


def test_guard_keeps_rtn_where_gptq_loses_on_held_out_windows(tmp_path):
    fp, calib = _guard_case()
    cfg = GPTQConfig(bits=3, group_size=16, guard=True, guard_windows=2)
    q = lowbit.quantize(copy.deepcopy(fp), cfg, calib)
    guard = q.lowbit_calibration["guard"]
    assert guard["judged"] == 14 and guard["reverted"]
    assert q.lowbit_calibration["n_samples"] == 4 and guard["held_out"]["n_samples"] == 2  # fit / held out
    stats = q.lowbit_report.extra["gptq"]["layers"]
    for name, s in stats.items():
        m = q.get_submodule(name)
        rc, rqp = rtn_solution(fp.get_submodule(name).weight, "int3", True, 16)
        is_rtn = torch.equal(m.dequantized_weight(), dequantize(rc, rqp))
        if name in guard["reverted"]:
            assert is_rtn and s["guard"]["rtn_error"] < s["guard"]["gptq_error"]
        else:
            assert s["guard"]["gptq_error"] <= s["guard"]["rtn_error"]
    lowbit.save(q, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "metadata.json").read_text())
    assert sorted(meta["calibration"]["guard"]["reverted"]) == sorted(guard["reverted"])
    assert meta["config"]["guard"] is True and meta["scheme"] == "gptq-w3-g16-sym-guard"


def test_guard_off_is_gptq_unchanged_and_guard_without_reverts_changes_nothing():
    fp, batches = tiny_llama(layers=2), tiny_batches(n=6, length=64)
    plain = lowbit.quantize(copy.deepcopy(fp), GPTQConfig(bits=4, group_size=16), batches[:4])
    guarded = lowbit.quantize(copy.deepcopy(fp), GPTQConfig(bits=4, group_size=16, guard=True, guard_windows=2),
                              batches)
    reverted = guarded.lowbit_calibration["guard"]["reverted"]
    first = min([int(r.split(".")[3]) for r in reverted], default=99)  # later layers see other inputs
    for name in plain.lowbit_report.layers:  # the same fit windows: identical codes wherever GPTQ was kept
        if name not in reverted and int(name.split(".")[3]) <= first:
            assert torch.equal(plain.get_submodule(name).qweight, guarded.get_submodule(name).qweight)
    assert plain.lowbit_calibration["sha256"] == guarded.lowbit_calibration["sha256"]


def test_guard_with_the_wa_presets_wrap():
    from lowbit.nn.wa_linear import WAQLinear

    fp, calib = _guard_case()
    cfg = GPTQConfig(bits=3, group_size=16, guard=True, guard_windows=2)
    report, stats = QuantizeReport(), {}

    def wrap(name, linear, codes, qp, g):
        return WAQLinear.from_quantized(linear, codes, qp, g, 8)

    model = copy.deepcopy(fp)
    process_layerwise(model, calib, make_gptq_process(cfg, PREFIX, report, stats, wrap, held_out=2))
    reverted = [n for n, s in stats.items() if s.get("fallback") == "rtn"]
    assert reverted and all(isinstance(model.get_submodule(n), WAQLinear) for n in stats)
    for name in reverted:
        rc, rqp = rtn_solution(fp.get_submodule(name).weight, "int3", True, 16)
        assert torch.equal(model.get_submodule(name).dequantized_weight(), dequantize(rc, rqp))


def test_gptaq_with_guard_runs_and_records():
    fp, calib = _guard_case()
    q = lowbit.quantize(copy.deepcopy(fp), build_config("gptaq", {"bits": 3, "group_size": 16}),
                        calib + tiny_batches(n=2, length=64, seed=6))
    assert q.lowbit_config.asymmetric_calib and q.lowbit_config.guard
    assert q.lowbit_scheme == "gptaq-w3-g16-sym-guard-attnh-resw" and q.lowbit_calibration["guard"]["judged"] == 14


def test_clear_errors():
    with pytest.raises(ConfigError, match="asym_alpha"):
        GPTQConfig(asymmetric_calib=True, asym_alpha=1.5)
    with pytest.raises(ConfigError, match="guard_windows"):
        GPTQConfig(guard=True, guard_windows=0)
    with pytest.raises(ConfigError, match="torchrun"):
        check_ranks_support(GPTQConfig(asymmetric_calib=True))
    with pytest.raises(ConfigError, match="held-out"):
        make_gptq_process(GPTQConfig(guard=True), PREFIX, QuantizeReport(), {})
    fp = tiny_llama(layers=1)
    with pytest.raises(CalibrationError, match="holds out the last 4"):
        lowbit.quantize(fp, GPTQConfig(bits=4, group_size=16, guard=True), tiny_batches(n=4, length=64))
