"""The decoder's C prompt attention (lowbit.kernels.prompt_attention) against SDPA with the causal mask."""

import pytest
import torch

from lowbit.kernels import prompt_attention

# exp by a degree-7 polynomial and another summation order: fp32 rounding only (observed ~2e-7).
ATTN_TOL = 2e-6


@pytest.mark.parametrize("bsz,nh,nkv,t,pos,hd", [(1, 9, 3, 128, 0, 64), (2, 4, 2, 7, 13, 32), (2, 6, 6, 1, 30, 16),
                                                 (1, 8, 2, 33, 0, 48)])
def test_matches_sdpa(bsz, nh, nkv, t, pos, hd):
    runs, why = prompt_attention.runs_here()
    if not runs:
        pytest.skip(why)
    g = torch.Generator().manual_seed(t)
    q = torch.randn(bsz, t, nh + nkv, hd, generator=g).transpose(1, 2)[:, :nh] * 3  # (B, nh, T, hd) strided as in the decoder
    k, v = torch.randn(bsz, nkv, 80, hd, generator=g), torch.randn(bsz, nkv, 80, hd, generator=g)
    args = (q, k[:, :, :pos + t], v[:, :, :pos + t], pos)
    got, want = prompt_attention.causal_attention(*args), prompt_attention.causal_attention_ref(*args)
    assert got.shape == want.shape == (bsz, t, nh * hd)
    assert float((got - want).norm() / want.norm()) < ATTN_TOL


def test_the_decoder_runs_it_on_prompts(monkeypatch):
    """A prompt through the decoder calls the kernel (not its fallback) and matches the SDPA decoder."""
    from lowbit.models.decode import Decoder
    from tests._tiny_llama import tiny_batches
    from tests.test_decode import _model

    runs, why = prompt_attention.runs_here()
    if not runs:
        pytest.skip(why)
    m = _model("int4-g32-sym")
    ids = tiny_batches(1, length=19)[0]
    ref = Decoder(m, max_len=32, kernel="reference").logits(ids)
    calls = []
    monkeypatch.setattr(prompt_attention, "causal_attention_ref", lambda *a: calls.append(a) or 1 / 0)
    got = Decoder(m, max_len=32).logits(ids)
    assert not calls
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4
