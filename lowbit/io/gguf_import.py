"""Import a Llama GGUF file into lowbit's packed modules, without building the fp32 model.

``load_gguf(path)`` reads the file with the ``gguf`` package's ``GGUFReader`` (memory-mapped), builds
a Hugging Face ``LlamaForCausalLM`` from the ``llama.*`` metadata **on the meta device** (no
weights allocated), then materialises each tensor straight into its lowbit module:

- Q4_0 blocks -> :class:`~lowbit.nn.WeightOnlyQLinear` ``int4`` symmetric, group 32, codes ``u - 8`` in
  ``[-8, 7]`` packed 4-bit and the fp16 ``d`` as the (possibly negative) scale;
- Q8_0 -> ``WeightOnlyQLinear`` ``int8`` symmetric, group 32;
- Q4_1 -> :class:`~lowbit.nn.BlockMinQLinear` (4-bit codes, fp16 ``d`` and fp16 ``m`` per block);
- F32 / F16 -> float tensors (norms; embeddings or heads stored in float).

Codes and scales are the file's bytes re-laid-out (see :mod:`lowbit.io.gguf_blocks`), so the
imported weights equal ``gguf.quants.dequantize`` of the file exactly. ``token_embd`` becomes a
:class:`~lowbit.nn.QTableEmbedding` over its quantized table; when the file has no ``output`` tensor
(tied embeddings) the LM head *is* that table. ``attn_q`` / ``attn_k`` rows are put back in Hugging
Face's order (:func:`unpermute_qk`). The tokenizer comes from transformers' GGUF tokenizer reader.
Every failure is a :class:`~lowbit.errors.LoadError` naming the file (and tensor).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import ConfigError, LoadError
from lowbit.io.gguf_blocks import decode_blocks, decode_blocks_packed, unpermute_qk
from lowbit.io.gguf_export import LAYER_NORMS, LAYER_TENSORS
from lowbit.nn.gguf_linear import QTableEmbedding, linear_from_ggml, linear_from_packed

log = logging.getLogger(__name__)

BLOCK_TYPES = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}
FLOAT_TYPES = ("F32", "F16")


class _File:
    """The parsed GGUF file: metadata values and tensors by name, with LoadErrors that name it."""

    def __init__(self, path: Path):
        try:
            import gguf
        except ImportError:  # pragma: no cover
            raise LoadError("reading GGUF needs the `gguf` package (pip install gguf)") from None
        self.path = path
        if not path.is_file():
            raise LoadError(f"{path}: no such file")
        try:
            self.reader = gguf.GGUFReader(str(path), "r")
        except Exception as exc:  # gguf raises ValueError / IndexError / struct errors on damaged files
            raise LoadError(f"{path}: not a readable GGUF file (truncated or corrupt?): "
                            f"{type(exc).__name__}: {exc}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def value(self, key: str, default=None, required: bool = False):
        f = self.reader.fields.get(key)
        if f is None:
            if required:
                raise LoadError(f"{self.path}: metadata key {key!r} missing")
            return default
        try:
            return f.contents()
        except Exception as exc:
            raise LoadError(f"{self.path}: metadata key {key!r} unreadable ({exc})") from None

    def tensor(self, name: str):
        t = self.tensors.get(name)
        if t is None:
            raise LoadError(f"{self.path}: tensor {name!r} missing")
        return t

    def float_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.tensor(name)
        kind = t.tensor_type.name
        if kind not in FLOAT_TYPES:
            raise LoadError(f"{self.path}: tensor {name!r} is {kind}; expected F32 or F16")
        data = np.asarray(t.data)
        if data.size != int(np.prod(shape)):
            raise LoadError(f"{self.path}: tensor {name!r} has {data.size} values, expected shape {shape}")
        return torch.from_numpy(data.astype(np.float32).reshape(shape))  # a copy, off the memory map

    def linear(self, name: str, shape: tuple[int, int], n_head: int | None, kernel: str) -> nn.Module:
        """The module for a (N, K) weight: packed lowbit module for Q4_0/Q4_1/Q8_0, nn.Linear for floats."""
        t = self.tensor(name)
        kind = t.tensor_type.name
        ne = tuple(int(x) for x in t.shape)
        if ne != (shape[1], shape[0]):
            raise LoadError(f"{self.path}: tensor {name!r} has dims {ne}, expected {(shape[1], shape[0])}")
        if kind in FLOAT_TYPES:
            w = self.float_tensor(name, shape)
            if n_head:
                w = unpermute_qk(w, n_head)
            lin = nn.Linear(shape[1], shape[0], bias=False)
            lin.weight = nn.Parameter(w, requires_grad=False)
            return lin
        qtype = BLOCK_TYPES.get(kind)
        if qtype is None:
            raise LoadError(f"{self.path}: tensor {name!r} has type {kind}; lowbit imports "
                            f"{', '.join(BLOCK_TYPES)} and {', '.join(FLOAT_TYPES)}")
        try:
            if not n_head:  # straight to lowbit's packed layout with uint8 operations
                qweight, d, m = decode_blocks_packed(qtype, t.data, shape)
                return linear_from_packed(shape, qtype, qweight, d, m, kernel=kernel)
            codes, d, m = decode_blocks(qtype, t.data, shape)
        except (ValueError, TypeError, IndexError, ConfigError) as exc:
            raise LoadError(f"{self.path}: tensor {name!r} ({kind}) unreadable (truncated?): {exc}") from None
        # q/k rows go back to Hugging Face's order (whole rows of blocks move)
        codes, d = unpermute_qk(codes, n_head), unpermute_qk(d, n_head)
        m = None if m is None else unpermute_qk(m, n_head)
        return linear_from_ggml(shape, qtype, codes, d, m, kernel=kernel)


def llama_config(f: _File):
    """A ``transformers.LlamaConfig`` from the file's ``llama.*`` metadata."""
    from transformers import LlamaConfig

    arch = f.value("general.architecture", required=True)
    if arch != "llama":
        raise LoadError(f"{f.path}: architecture {arch!r}; lowbit imports 'llama' GGUF files")
    a = "llama."
    hidden = int(f.value(a + "embedding_length", required=True))
    heads = int(f.value(a + "attention.head_count", required=True))
    head_dim = int(f.value(a + "attention.key_length", 0) or f.value(a + "rope.dimension_count", 0) or hidden // heads)
    tokens = f.reader.fields.get("tokenizer.ggml.tokens")
    vocab = f.value(a + "vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        vocab = int(f.tensor("token_embd.weight").shape[1])
    return LlamaConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(f.value(a + "feed_forward_length", required=True)),
        num_hidden_layers=int(f.value(a + "block_count", required=True)), num_attention_heads=heads,
        num_key_value_heads=int(f.value(a + "attention.head_count_kv", heads)), head_dim=head_dim,
        max_position_embeddings=int(f.value(a + "context_length", 2048)),
        rms_norm_eps=float(f.value(a + "attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(f.value(a + "rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in f.tensors,
        bos_token_id=f.value("tokenizer.ggml.bos_token_id"), eos_token_id=f.value("tokenizer.ggml.eos_token_id"),
        pad_token_id=f.value("tokenizer.ggml.padding_token_id"),
    )


def _tokenizer(path: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # a file without a usable tokenizer still imports; evaluation needs one
        log.warning("%s: no tokenizer loaded (%s)", path, exc)
        return None


def load_gguf(path: str | Path, kernel: str = "auto", tokenizer: bool = True) -> nn.Module:
    """A lowbit ``CausalLM`` from a Llama GGUF file, with Q4_0 / Q4_1 / Q8_0 tensors kept packed.

    The architecture is built on the meta device and only the file's tensors are materialised, so
    the fp32 model never exists in memory. The result carries ``gguf_source`` (the file, which the
    exporter reuses for the tokenizer), ``lowbit_scheme`` (``gguf-<most common block type>``) and
    ``lowbit_fp32_numel``.
    """
    from transformers import LlamaForCausalLM

    from lowbit.models.smollm2 import CausalLM

    path = Path(path)
    f = _File(path)
    cfg = llama_config(f)
    with torch.device("meta"):
        lm = LlamaForCausalLM(cfg)  # shapes only, no storage
    n, k, ff = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = {"attn_q": (cfg.num_attention_heads * k, n), "attn_k": (cfg.num_key_value_heads * k, n),
              "attn_v": (cfg.num_key_value_heads * k, n), "attn_output": (n, cfg.num_attention_heads * k),
              "ffn_gate": (ff, n), "ffn_up": (ff, n), "ffn_down": (n, ff)}
    kinds = Counter()

    def norm(name: str) -> nn.Parameter:
        return nn.Parameter(f.float_tensor(name, (n,)), requires_grad=False)

    emb_name = "token_embd.weight"
    table = f.linear(emb_name, (cfg.vocab_size, n), None, kernel)
    if isinstance(table, nn.Linear):
        lm.model.embed_tokens = nn.Embedding(cfg.vocab_size, n, _weight=table.weight.data, _freeze=True)
    else:
        lm.model.embed_tokens = QTableEmbedding(table)
    for i, layer in enumerate(lm.model.layers):
        for hf, gn in LAYER_NORMS.items():
            getattr(layer, hf).weight = norm(f"blk.{i}.{gn}.weight")
        for hf, gn in LAYER_TENSORS.items():
            heads = cfg.num_attention_heads if gn == "attn_q" else cfg.num_key_value_heads if gn == "attn_k" else None
            name = f"blk.{i}.{gn}.weight"
            parent, _, child = hf.rpartition(".")
            setattr(layer.get_submodule(parent), child, f.linear(name, shapes[gn], heads, kernel))
            kinds[f.tensors[name].tensor_type.name] += 1
    lm.model.norm.weight = norm("output_norm.weight")
    if "output.weight" in f.tensors:
        lm.lm_head = f.linear("output.weight", (cfg.vocab_size, n), None, kernel)
    elif isinstance(table, nn.Linear):
        lm.lm_head = table  # tied: the head is the float embedding table
    else:
        lm.lm_head = table  # tied: the head is the quantized embedding table itself
    lm.model.rotary_emb = type(lm.model.rotary_emb)(config=cfg)  # its inv_freq buffer was built on meta
    left = [name for name, t in list(lm.named_parameters()) + list(lm.named_buffers()) if t.is_meta]
    if left:
        raise LoadError(f"{path}: no data for {left[:5]} (the file lacks tensors this architecture needs)")
    lm.eval()
    numel = sum(int(t.n_elements) for t in f.reader.tensors)
    tied = "output.weight" not in f.tensors
    del f  # drop the memory map and the parsed metadata before the tokenizer reads the file again
    model = CausalLM(lm, _tokenizer(path) if tokenizer else None).eval()
    model.model_name = path.stem
    model.gguf_source = str(path)
    model.lowbit_scheme = f"gguf-{kinds.most_common(1)[0][0].lower()}" if kinds else "gguf"
    model.lowbit_fp32_numel = numel
    from lowbit.api import QuantizeReport

    # Per quantized module its spec, as lowbit.quantize reports it (the tied head shares the table).
    model.lowbit_report = QuantizeReport(layers={name: mod.spec() for name, mod in model.named_modules(
        remove_duplicate=False) if hasattr(mod, "spec") and not name.endswith(".table")})
    log.info("imported %s: %d layers, linear types %s, tied head %s", path.name, cfg.num_hidden_layers,
             dict(kinds), tied)
    return model


__all__ = ["load_gguf", "llama_config"]
