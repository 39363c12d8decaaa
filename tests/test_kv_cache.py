"""Quantized KV cache: against an unquantized cache, per-channel keys / per-token values, the
full-precision window, generation through transformers, bytes per token."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lowbit.errors import ConfigError
from lowbit.nn.kv_cache import KVCacheLM, QuantizedKVCache, QuantizedKVLayer, kv_bytes_per_token, make_cache
from tests._tiny_llama import tiny_batches, tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small ops, one thread


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(layers=2)


def _states(tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 3, tokens, 16, generator=g)
    k[..., 5] += 20  # a key outlier channel, as in real LLMs
    return k, torch.randn(2, 3, tokens, 16, generator=g)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_layer_returns_window_exactly_and_past_within_half_a_step(bits):
    layer = QuantizedKVLayer(bits, group=8, residual=4, sink=0)  # KIVI's layout alone
    k, v = _states(45)
    out_k, out_v = layer.update(k[..., :30, :], v[..., :30, :])
    assert torch.equal(out_k, k[..., :30, :])  # the prefill attends to its own states in full precision
    out_k, out_v = layer.update(k[..., 30:, :], v[..., 30:, :])
    assert out_k.shape == k.shape and layer.get_seq_length() == 45
    nq = layer.n_quantized
    assert nq == 40 and 4 <= 45 - nq < 4 + 8  # whole blocks of 8 aged past the 4-token window
    assert torch.equal(out_k[..., nq:, :], k[..., nq:, :])
    # Keys: one grid per (batch, head, channel) per block of 8 tokens; values: per (batch, head, token).
    kb = k[..., :nq, :].reshape(2, 3, nq // 8, 8, 16)
    k_step = (kb.amax(dim=3) - kb.amin(dim=3)) / (2**bits - 1)  # (2, 3, blocks, 16)
    k_err = (out_k[..., :nq, :] - k[..., :nq, :]).abs().reshape(2, 3, nq // 8, 8, 16).amax(dim=3)
    assert (k_err <= 0.5 * k_step * 1.01 + 2e-2 * k_step.clamp_min(1)).all()
    v_step = (v[..., :nq, :].amax(-1) - v[..., :nq, :].amin(-1)) / (2**bits - 1)  # (2, 3, nq)
    v_err = (out_v[..., :nq, :] - v[..., :nq, :]).abs().amax(-1)
    assert (v_err <= 0.5 * v_step * 1.01 + 1e-2 * v_step).all()


def test_sink_tokens_stay_exact_and_blocks_start_after_them():
    k, v = _states(46, seed=1)
    k[..., 0, :] *= 50  # an attention-sink token: a huge first key

    def filled(sink):
        layer = QuantizedKVLayer(4, group=8, residual=4, sink=sink)
        layer.update(k[..., :7, :], v[..., :7, :])  # fewer tokens than the sink + window
        layer.update(k[..., 7:45, :], v[..., 7:45, :])
        return layer, *layer.update(k[..., 45:, :], v[..., 45:, :])  # reads the quantized past back

    layer, out_k, out_v = filled(sink=2)
    assert out_k.shape == k.shape and layer.get_seq_length() == 46
    assert torch.equal(out_k[..., :2, :], k[..., :2, :]) and torch.equal(out_v[..., :2, :], v[..., :2, :])
    assert layer.n_quantized == 40  # blocks of 8 from token 2 on; 4 tokens left in the window
    assert torch.equal(out_k[..., 34:, :], k[..., 34:, :])  # quantized by this update: read in full
    _, plain_k, _ = filled(sink=0)
    err = float((out_k[..., 2:10, :] - k[..., 2:10, :]).abs().max())
    err_plain = float((plain_k[..., 1:8, :] - k[..., 1:8, :]).abs().max())
    assert err < 0.1 * err_plain  # the sink's range no longer widens its block's per-channel grids
    layer.reset()
    assert layer.get_seq_length() == 0
    out_k, _ = layer.update(k[..., :3, :], v[..., :3, :])
    assert torch.equal(out_k, k[..., :3, :]) and layer.sink_keys.shape[-2] == 2


def test_per_channel_keys_beat_per_token_keys_on_outlier_channel():
    k, _ = _states(64, seed=3)
    layer = QuantizedKVLayer(4, group=64, residual=0, sink=0)
    out_k, _ = layer.update(k, k)
    out_k, out_v = layer.update(k[..., :1, :], k[..., :1, :])  # read the quantized past back
    err_channel = float(((out_k[..., :64, :] - k) ** 2).mean())  # keys: per channel
    err_token = float(((out_v[..., :64, :] - k) ** 2).mean())  # the same tensor stored per token
    assert err_channel < 0.5 * err_token


def test_cached_forward_matches_unquantized_cache(tiny):
    ids = tiny_batches(n=1, length=96, seed=4)[0]
    with torch.no_grad():
        full = tiny(ids)
        fp_chunked = KVCacheLM(tiny, None, chunk=16)(ids)
        torch.testing.assert_close(fp_chunked, full, rtol=1e-4, atol=1e-4)  # chunking itself changes nothing

        def kl(kv):
            logp = torch.log_softmax(KVCacheLM(tiny, kv, chunk=16)(ids), -1)
            ref = torch.log_softmax(full, -1)
            return float((ref.exp() * (ref - logp)).sum(-1).mean())

        k8, k4, k2 = kl("int8"), kl("int4"), kl("int2")
    KL_INT8_MAX = 1e-4  # int8 grids: errors ~0.4% of each block's range
    assert k8 < KL_INT8_MAX
    assert k8 < k4 < k2


def test_generate_through_transformers(tiny):
    ids = tiny_batches(n=1, length=40, seed=5)[0]
    cache = QuantizedKVCache(tiny.lm.config, bits=8, group=8, residual=8)
    with torch.no_grad():
        out = tiny.lm.generate(ids, cache=cache, max_new_tokens=12, do_sample=False,
                               pad_token_id=0)
        ref = tiny.lm.generate(ids, cache=DynamicCache(config=tiny.lm.config), max_new_tokens=12,
                               do_sample=False, pad_token_id=0)
    assert out.shape == (1, 52)
    assert cache.get_seq_length() == 51  # the last generated token is never fed back
    assert cache.layers[0].n_quantized == 40
    assert (out[0, 40:] == ref[0, 40:]).float().mean() >= 0.75  # int8 rarely flips a greedy token


def test_bytes_per_token_and_bad_input(tiny):
    cfg = tiny.lm.config
    fp = kv_bytes_per_token(cfg, None)
    b8, b4 = kv_bytes_per_token(cfg, 8), kv_bytes_per_token(cfg, 4)
    # head_dim 16 here: fp16 per-token value grids and the 32-token fp32 window weigh more than on SmolLM2
    assert b8 < fp / 2.5 and b4 < 0.7 * b8
    cache = make_cache(cfg, "int4")
    with torch.no_grad():
        tiny.lm(input_ids=tiny_batches(1, 96, seed=2)[0], cache=cache, use_cache=True)  # sink 1, a block, a window
    assert 0 < cache.nbytes() < 96 * fp
    with pytest.raises(ConfigError, match="valid: int8, int4"):
        make_cache(cfg, "int3")
    with pytest.raises(ConfigError, match="bits must be one of"):
        QuantizedKVLayer(bits=3)
    with pytest.raises(ConfigError, match="sink >= 0"):
        QuantizedKVLayer(bits=4, sink=-1)


@pytest.mark.parametrize("args, words", [(["--kv-sink", "2"], "needs --kv-cache"),
                                         (["--kv-cache", "int4", "--kv-sink", "-1"], ">= 0")])
def test_eval_kv_sink_refuses_bad_values_before_loading(monkeypatch, args, words):
    """`lowbit eval --kv-sink`: a clean error before any model loads (a sink without a cache, a negative count)."""
    from typer.testing import CliRunner

    import lowbit.cli.eval as eval_cli
    from lowbit.cli import app

    def forbidden(*a, **k):
        raise AssertionError("a model was loaded despite an invalid value")

    monkeypatch.setattr(eval_cli, "_load_target", forbidden)
    result = CliRunner().invoke(app, ["eval", "smollm2", *args])
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2, (result.exit_code, out, result.exception)
    assert words in out and "Traceback" not in out
