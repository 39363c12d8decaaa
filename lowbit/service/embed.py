"""Sentence embeddings from a served encoder: tokenize, forward, pool (the model's own pipeline).

Same computation as ``SentenceEncoder.encode`` (length-sorted batches to cut padding), plus token
counts for OpenAI-style ``usage`` and an optional no-truncation check: by default inputs longer
than the model's ``max_seq_length`` tokens are truncated, as sentence-transformers does; with
``truncate=False`` they are refused with the limit in the message (TEI's behaviour).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.service.errors import InputTooLarge

FORWARD_BATCH = 32  # sentences per forward pass inside one request


def count_tokens(model: nn.Module, sentences: list[str]) -> list[int]:
    """Tokens per sentence including special tokens, without truncation."""
    ids = model.tokenizer(list(sentences), add_special_tokens=True, truncation=False)["input_ids"]
    return [len(x) for x in ids]


def embed(model: nn.Module, sentences: list[str], truncate: bool = True) -> tuple[torch.Tensor, int]:
    """Unit-norm embeddings (N, D) in input order, and the number of tokens the model saw."""
    emb, counts = embed_counted(model, sentences, truncate)
    return emb, sum(counts)


def embed_counted(model: nn.Module, sentences: list[str], truncate: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Unit-norm embeddings (N, D) in input order, and the tokens the model saw for each input."""
    if not sentences:
        return torch.empty(0, 0), []
    limit = model.max_seq_length
    if not truncate:
        for i, n in enumerate(count_tokens(model, sentences)):
            if n > limit:
                raise InputTooLarge(f"input {i} has {n} tokens; the model's limit is {limit} tokens "
                                    "(send truncate=true to cut longer inputs)", "tokens")
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    chunks, counts = [], [0] * len(sentences)
    with torch.inference_mode():
        for start in range(0, len(order), FORWARD_BATCH):
            idx = order[start:start + FORWARD_BATCH]
            feats = model.tokenize([sentences[i] for i in idx])
            emb = model(feats["input_ids"], feats["attention_mask"], feats.get("token_type_ids"))  # (b, D)
            for i, n in zip(idx, feats["attention_mask"].sum(dim=1).tolist()):  # (b,)
                counts[i] = int(n)
            chunks.append((idx, emb.float()))
    dim = chunks[0][1].shape[1]
    out = torch.empty(len(sentences), dim)
    for idx, emb in chunks:
        out[idx] = emb
    return out, counts
