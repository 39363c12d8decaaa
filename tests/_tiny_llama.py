"""A tiny random Llama wrapped like lowbit's CausalLM, for fast unit tests of the LLM methods."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.models.smollm2 import CausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                      max_position_embeddings=256, tie_word_embeddings=True)
    lm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # give the norms non-trivial weights so smoothing folds are really exercised
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand_like(p))
    m = CausalLM(lm, tokenizer=None).eval()
    m.model_name = "tiny-llama"
    return m


def tiny_batches(n: int = 4, length: int = 32, vocab: int = 128, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


def assert_reloads_identically(q, folder):
    """Save the quantized tiny Llama ``q`` to ``folder``, load it into a fresh (differently seeded) instance (lowbit
    cannot rebuild the tiny model by itself) and check its logits equal ``q``'s exactly; returns the loaded model."""
    import lowbit

    ids = tiny_batches(2, 32, seed=5)
    with torch.no_grad():
        before = [q(x) for x in ids]
    lowbit.save(q, folder)
    loaded = lowbit.load(folder, model=tiny_llama(seed=123))
    with torch.no_grad():
        after = [loaded(x) for x in ids]
    for a, b in zip(before, after):
        a = a.logits if hasattr(a, "logits") else a
        b = b.logits if hasattr(b, "logits") else b
        assert torch.equal(a, b)
    return loaded
