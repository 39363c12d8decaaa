"""v_proj's attention-mixed GPTQ Hessian (``GPTQConfig(attention_hessian=True)``, lowbit.algorithms.attention_hessian; across torchrun ranks:
tests/test_gptq_ranks.py's CLI test, whose gptq scheme uses it):
the mixed inputs are ``A x`` per head with the model's own attention probabilities, the probe leaves the model's
outputs unchanged, and GPTQ / GPTAQ / the guard use them for v_proj only."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.algorithms.attention_hessian import attention_probs, mixed_value_inputs
from lowbit.algorithms.gptq import GPTQ, GPTQConfig
from lowbit.errors import ConfigError
from lowbit.nn import WeightOnlyQLinear
from tests._tiny_llama import tiny_batches, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small ops, one thread

W4 = dict(bits=4, group_size=16, symmetric=True)


def _eager_reference(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's attention probabilities (1, H, T, T) from transformers' eager attention and v_proj's inputs (1, T, K)."""
    lm = model.lm
    seen = []
    hook = lm.model.layers[0].self_attn.v_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    impl = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = lm(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        lm.config._attn_implementation = impl
        hook.remove()
    return out.attentions[0], seen[0]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_mixed_inputs_are_attention_times_inputs(impl):
    model = tiny_llama(layers=2)
    model.lm.config._attn_implementation = impl
    ids = tiny_batches(n=1, length=24, seed=3)[0]
    probs, x = _eager_reference(model, ids)
    want = (probs @ x[:, None]).reshape(-1, x.shape[-1])  # (H * T, K): z[h, i] = sum_j a[h, i, j] x[j]
    got = []
    with mixed_value_inputs(model.lm.model.layers[0].self_attn, got.append), torch.no_grad():
        model(ids)
    assert len(got) == 1 and got[0].shape == (4 * 24, 64)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-6)
    assert model.lm.config._attn_implementation == impl  # restored


def test_probe_leaves_outputs_unchanged_and_probs_are_causal():
    model = tiny_llama(layers=2)
    ids = tiny_batches(n=1, length=16, seed=4)[0]
    with torch.no_grad():
        before = model(ids)
        with mixed_value_inputs(model.lm.model.layers[1].self_attn, lambda z: None):
            during = model(ids)
    assert torch.equal(before, during)
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    p = attention_probs(q, k, None, None)
    assert torch.allclose(p.sum(-1), torch.ones(1, 4, 5)) and (p.triu(1) == 0).all()
    keep = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    assert torch.allclose(attention_probs(q, k, keep, None), p)  # a boolean causal mask: the same


def test_gptq_uses_the_mixed_hessian_for_v_proj_only():
    fp, windows = tiny_llama(layers=2), tiny_batches(n=4, length=64, seed=7)
    plain = lowbit.quantize(copy.deepcopy(fp), GPTQConfig(**W4), windows)
    mixed = lowbit.quantize(copy.deepcopy(fp), GPTQConfig(**W4, attention_hessian=True), windows)
    assert GPTQConfig(**W4, attention_hessian=True).scheme.endswith("-attnh")
    stats = mixed.lowbit_report.extra["gptq"]["layers"]
    assert {n for n, s in stats.items() if s.get("hessian")} == {f"lm.model.layers.{i}.self_attn.v_proj"
                                                                 for i in range(2)}
    prefix = "lm.model.layers.0."
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        # layer 0 reads the same inputs either way, and only v_proj's Hessian changed
        assert torch.equal(mixed.get_submodule(prefix + name).dequantized_weight(),
                           plain.get_submodule(prefix + name).dequantized_weight())
    v = mixed.get_submodule(prefix + "self_attn.v_proj")
    assert not torch.equal(v.dequantized_weight(), plain.get_submodule(prefix + "self_attn.v_proj").dequantized_weight())
    # the same solve on mixed inputs computed independently (transformers' eager probabilities)
    h = GPTQ(64)
    for ids in windows:
        probs, x = _eager_reference(fp, ids)
        h.add_batch((probs @ x[:, None]).reshape(-1, 64))
    codes, qp, _ = h.solve(fp.get_submodule(prefix + "self_attn.v_proj").weight, "int4", True, 16)
    ref = WeightOnlyQLinear.from_quantized(fp.get_submodule(prefix + "self_attn.v_proj"), codes, qp, 16, "auto")
    agree = (ref.dequantized_weight() == v.dequantized_weight()).float().mean()
    assert agree > 0.99  # the probabilities differ from eager's in the last bits (sdpa recomputed)


def test_mixed_hessian_lowers_the_attention_output_error():
    """What the option targets: v_proj's error as the attention outputs see it (layer 0, on the calibration windows;
    a random tiny model has no attention sink, so held-out windows would not show the gain SmolLM2 shows)."""
    fp, windows = tiny_llama(layers=1), tiny_batches(n=4, length=64, seed=7)
    errors = {}
    for on in (False, True):
        q = lowbit.quantize(copy.deepcopy(fp), GPTQConfig(**W4, attention_hessian=on), windows)
        v, ref = q.lm.model.layers[0].self_attn.v_proj, fp.lm.model.layers[0].self_attn.v_proj
        err = 0.0
        for ids in windows:
            probs, x = _eager_reference(fp, ids)
            z = probs @ x[:, None]  # (1, H, T, K)
            err += float(((v(z) - ref(z)) ** 2).sum().detach())
        errors[on] = err
    assert errors[True] < errors[False]


def test_gptaq_and_guard_with_the_mixed_hessian():
    fp, windows = tiny_llama(layers=2), tiny_batches(n=6, length=64, seed=7)
    q = lowbit.quantize(copy.deepcopy(fp), GPTQConfig(**W4, asymmetric_calib=True, guard=True, guard_windows=2,
                                                      attention_hessian=True), windows)
    stats = q.lowbit_report.extra["gptq"]["layers"]
    v = stats["lm.model.layers.1.self_attn.v_proj"]
    assert v["hessian"] == "attention-mixed inputs" and set(v["guard"]) == {"gptq_error", "rtn_error"}
    assert q.lowbit_calibration["guard"]["judged"] == 14
    with torch.no_grad():
        assert torch.isfinite(q(windows[0])).all()


def test_scheme_option_and_bad_input():
    from lowbit.algorithms.awq import AWQConfig
    from lowbit.algorithms.gptq import SCHEME_ATTENTION_HESSIAN
    from lowbit.config import build_config

    for scheme in ("gptq", "gptaq", "gptaq-rot", "gptq-nf4", "awq-gptq", "awq-gptaq"):
        assert build_config(scheme, {}).attention_hessian is SCHEME_ATTENTION_HESSIAN
        assert build_config(scheme, {"attention_hessian": False}).attention_hessian is False
    assert build_config("gptq", {"gguf": "q4_0", "attention_hessian": True}).attention_hessian is True
    assert GPTQConfig().attention_hessian is False  # the library config keeps the plain Hessian unless asked
    with pytest.raises(ConfigError, match="does not take attention_hessian"):
        build_config("awq", {"attention_hessian": True})  # plain AWQ rounds with RTN: no Hessian
    with pytest.raises(ConfigError, match="rounding 'gptq' or 'gptaq'"):
        AWQConfig(attention_hessian=True)


def test_attention_without_the_interface_gets_plain_inputs_and_a_warning(caplog):
    from types import SimpleNamespace

    class Direct(torch.nn.Module):  # computes its own attention: the probe never sees probabilities
        def __init__(self):
            super().__init__()
            self.v_proj = torch.nn.Linear(8, 8)
            self.config = SimpleNamespace(_attn_implementation="sdpa")

        def forward(self, x):
            return self.v_proj(x)

    attn, got, x = Direct(), [], torch.randn(1, 5, 8)
    with mixed_value_inputs(attn, got.append), torch.no_grad():
        attn(x)
        attn(x)
    assert len(got) == 2 and torch.equal(got[0], x[0]) and attn.config._attn_implementation == "sdpa"
    assert caplog.text.count("no attention probabilities") == 1
    with pytest.raises(ValueError, match="no v_proj"):
        with mixed_value_inputs(torch.nn.Linear(2, 2), got.append):
            pass
