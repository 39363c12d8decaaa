"""The residual writers' token-weighted GPTQ Hessian (``GPTQConfig(residual_weights=True)``,
lowbit.algorithms.residual_hessian): o_proj / down_proj inputs scaled by 1 / rms of the residual after their add,
checked against the residual computed independently from transformers' hidden states; the other linears unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.algorithms.gptq import GPTQ, GPTQConfig
from lowbit.algorithms.residual_hessian import inverse_rms, residual_sources, residual_weighted_inputs
from lowbit.models.adapters import LLAMA_GROUPS
from lowbit.nn import WeightOnlyQLinear
from tests._tiny_llama import tiny_batches, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small ops, one thread

W4 = dict(bits=4, group_size=16, symmetric=True)
PREFIX = "lm.model.layers.0."


def _independent(model, ids) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer 0's o_proj / down_proj inputs (T, K) and the residual after each one's add (T, C): the layer's input
    plus o_proj's output for o_proj, transformers' hidden state after layer 0 for down_proj."""
    lm, seen = model.lm, {}
    layer = lm.model.layers[0]
    hooks = [layer.self_attn.o_proj.register_forward_hook(lambda m, a, o: seen.update(o_in=a[0][0], o_out=o[0])),
             layer.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.update(d_in=a[0][0]))]
    try:
        with torch.no_grad():
            out = lm(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    h0, h1 = out.hidden_states[0][0], out.hidden_states[1][0]
    return {"self_attn.o_proj": (seen["o_in"], h0 + seen["o_out"]), "mlp.down_proj": (seen["d_in"], h1)}


def test_sources_are_the_next_norm_or_the_layer_output():
    layer = tiny_llama(layers=1).lm.model.layers[0]
    src = residual_sources(layer, LLAMA_GROUPS)
    assert src == {"self_attn.o_proj": layer.post_attention_layernorm, "mlp.down_proj": None}

    class Sandwich(torch.nn.Module):  # Gemma 2 / 3: the writers' outputs are normalised before the add
        post_feedforward_layernorm = torch.nn.Identity()

    assert residual_sources(Sandwich(), LLAMA_GROUPS) == {}


def test_weighted_inputs_are_inputs_over_the_residual_rms():
    model = tiny_llama(layers=2)
    layer = model.lm.model.layers[0]
    ids = tiny_batches(n=1, length=24, seed=3)[0]
    want = _independent(model, ids)
    names = ("self_attn.o_proj", "mlp.down_proj")
    got = {}
    with residual_weighted_inputs(layer, {n: layer.get_submodule(n) for n in names},
                                  residual_sources(layer, LLAMA_GROUPS), got.__setitem__), torch.no_grad():
        model(ids)
    for n in names:
        x, r = want[n]
        torch.testing.assert_close(got[n][0], x * inverse_rms(r), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inverse_rms(torch.full((1, 4), 3.0)), torch.full((1, 1), 1 / 3))


def test_gptq_weights_the_residual_writers_only():
    fp, windows = tiny_llama(layers=2), tiny_batches(n=4, length=64, seed=7)
    plain = lowbit.quantize(copy.deepcopy(fp), GPTQConfig(**W4), windows)
    config = GPTQConfig(**W4, residual_weights=True)
    weighted = lowbit.quantize(copy.deepcopy(fp), config, windows)
    assert config.scheme.endswith("-resw")
    stats = weighted.lowbit_report.extra["gptq"]["layers"]
    assert {n for n, s in stats.items() if s.get("hessian") == "residual-weighted inputs"} == {
        f"lm.model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.o_proj", "mlp.down_proj")}
    for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        # layer 0 reads the same inputs either way, and only the writers' Hessians changed
        assert torch.equal(weighted.get_submodule(PREFIX + name).dequantized_weight(),
                           plain.get_submodule(PREFIX + name).dequantized_weight())
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        # the same solve on weighted inputs computed independently (hidden states, o_proj's output)
        lin = fp.get_submodule(PREFIX + name)
        h = GPTQ(lin.in_features)
        for ids in windows:
            x, r = _independent(fp, ids)[name]
            h.add_batch(x * inverse_rms(r))
        codes, qp, _ = h.solve(lin.weight, "int4", True, 16)
        ref = WeightOnlyQLinear.from_quantized(lin, codes, qp, 16, "auto").dequantized_weight()
        got = weighted.get_submodule(PREFIX + name).dequantized_weight()
        assert (ref == got).float().mean() > 0.99  # the residual is summed in another order: last-bit differences
        assert not torch.equal(got, plain.get_submodule(PREFIX + name).dequantized_weight())


def test_the_weighted_objective_is_what_the_solve_lowers():
    """What the option targets: one token with a massive input and a massive residual (an attention sink) takes the
    whole plain Hessian; weighted by 1 / ms(residual), the other tokens' error relative to their residual drops."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[0] *= 300.0  # the sink's input
    ms = torch.ones(512, 1)
    ms[0] = 900.0 ** 2  # the sink's residual mean square
    w = torch.randn(32, 64, generator=g)
    errs = {}
    for name, rows in (("plain", x), ("weighted", x / ms.sqrt())):
        h = GPTQ(64)
        h.add_batch(rows)
        codes, qp, _ = h.solve(w, "int4", True, 16)
        dw = WeightOnlyQLinear.from_quantized(torch.nn.Linear(64, 32, bias=False), codes, qp, 16,
                                              "auto").dequantized_weight() - w
        errs[name] = float((((x @ dw.T) ** 2) / ms).sum())
    assert errs["weighted"] < 0.9 * errs["plain"]


def test_gptaq_guard_and_scheme_options():
    from lowbit.config import build_config
    from lowbit.errors import ConfigError

    fp, windows = tiny_llama(layers=2), tiny_batches(n=6, length=64, seed=7)
    q = lowbit.quantize(copy.deepcopy(fp), GPTQConfig(**W4, asymmetric_calib=True, guard=True, guard_windows=2,
                                                      attention_hessian=True, residual_weights=True), windows)
    st = q.lowbit_report.extra["gptq"]["layers"]["lm.model.layers.1.mlp.down_proj"]
    assert st["hessian"] == "residual-weighted inputs" and set(st["guard"]) == {"gptq_error", "rtn_error"}
    with torch.no_grad():
        assert torch.isfinite(q(windows[0])).all()
    for scheme in ("gptq", "gptaq", "gptaq-rot", "gptq-nf4", "awq-gptaq"):
        assert build_config(scheme, {}).residual_weights is True  # on in these schemes (calibration windows)
        assert build_config(scheme, {"residual_weights": False}).residual_weights is False
    assert build_config("awq-gptq", {}).residual_weights is False  # off there (it raised held-out calibration KL)
    assert build_config("awq-gptq", {"residual_weights": True}).gptq_config().residual_weights is True
    assert GPTQConfig().residual_weights is False
    with pytest.raises(ConfigError, match="does not take residual_weights"):
        build_config("awq", {"residual_weights": True})
    from lowbit.algorithms.awq import AWQConfig

    cfg = AWQConfig(rounding="gptaq", residual_weights=True)
    assert cfg.gptq_config().residual_weights and cfg.scheme.endswith("-resw")
    with pytest.raises(ConfigError, match="rounding 'gptq' or 'gptaq'"):
        AWQConfig(residual_weights=True)  # plain AWQ rounds with RTN: no Hessian
