"""Tiny random-weight Hugging Face folders, one per supported family, for pipeline tests (never results).

Each folder holds what a user's model folder holds: ``config.json``, ``model.safetensors`` and a
tokenizer. The tokenizer is a word-level one over the words of lowbit's evaluation sentences, built
offline with the ``tokenizers`` package (vocabulary ``VOCAB`` entries), so no hub download is needed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

VOCAB = 256
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lowbit.data import calib_sentences

    words = sorted({w.lower() for s in calib_sentences(200) for w in re.findall(r"[A-Za-z]+", s)})
    vocab = {t: i for i, t in enumerate(SPECIALS + words[: VOCAB - len(SPECIALS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", bos_token="<s>", eos_token="</s>",
                                   model_max_length=512)


def _configs() -> dict:
    import transformers as tf

    enc = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=72, pad_token_id=0)
    dec = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, max_position_embeddings=128, pad_token_id=0, bos_token_id=5, eos_token_id=6)
    return {
        "bert": lambda: tf.BertConfig(**enc),
        "roberta": lambda: tf.RobertaConfig(**enc),
        "xlm-roberta": lambda: tf.XLMRobertaConfig(**enc),
        "distilbert": lambda: tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                  max_position_embeddings=72, pad_token_id=0),
        "mpnet": lambda: tf.MPNetConfig(**enc),
        "llama": lambda: tf.LlamaConfig(**dec, tie_word_embeddings=True),
        "mistral": lambda: tf.MistralConfig(**dec),
        "qwen2": lambda: tf.Qwen2Config(**dec, tie_word_embeddings=True),
        "qwen3": lambda: tf.Qwen3Config(**dec, head_dim=16),
        "gemma": lambda: tf.GemmaConfig(**dec, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**dec, head_dim=16),
        "phi3": lambda: tf.Phi3Config(**dec),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=5, eos_token_id=6),
    }


FAMILIES = tuple(_configs())
ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet")
DECODERS = tuple(f for f in FAMILIES if f not in ENCODERS)


def tiny_folder(family: str, out: Path, seed: int = 0) -> Path:
    """Write a tiny random ``family`` model folder (config, safetensors, tokenizer) to ``out``."""
    import transformers as tf

    config = _configs()[family]()
    torch.manual_seed(seed)
    cls = tf.AutoModel if family in ENCODERS else tf.AutoModelForCausalLM
    model = cls.from_config(config).eval()
    with torch.no_grad():  # larger-than-init weights so that quantization error is visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tiny_tokenizer().save_pretrained(str(out))
    return out
