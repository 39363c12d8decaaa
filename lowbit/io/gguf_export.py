"""Export a lowbit-quantized Llama causal LM to a GGUF file that llama.cpp loads.

What is written (GGUF v3 through the ``gguf`` package's ``GGUFWriter``):

- metadata: ``general.architecture = "llama"``, ``llama.*`` hyper-parameters (block count, context,
  embedding / feed-forward length, head counts, rope dims and base, RMS epsilon, vocab size),
  ``general.file_type`` and the tokenizer: every ``tokenizer.*`` key copied from the source GGUF
  when the model came from one (``source_gguf``), else built from the Hugging Face tokenizer
  (byte-level BPE: tokens, token types, merges, special ids, chat template);
- tensors with llama.cpp's names (``token_embd``, ``blk.N.attn_{norm,q,k,v,output}``,
  ``blk.N.ffn_{norm,gate,up,down}``, ``output_norm``, ``output`` unless tied). Norms are F32.
  ``attn_q`` / ``attn_k`` rows are permuted as llama.cpp's converter does (:func:`permute_qk`).

Linear weights go to the target type ``q4_0`` / ``q4_1`` / ``q8_0`` (blocks of 32 along the input,
layouts in :mod:`lowbit.io.gguf_blocks`). A layer whose quantization already lies on the target
grid is written **unchanged** (its own integer codes and fp16 scales, bit-exact):

- every 32-block must sit inside one lowbit group (``K % 32 == 0`` and ``group_size % 32 == 0``, or
  per channel), so each block has one scale (and one zero-point);
- Q4_0: symmetric codes in ``[-8, 7]`` (int4, int3, int2): ``d = scale``;
- Q4_1: symmetric codes ``q`` in ``[-8, 7]``: ``u = q + 8``, ``d = scale``, ``m = -8 scale`` (exact in
  fp16); affine ``uint4`` codes: ``u = q``, ``d = scale``, ``m = -scale * zero_point`` rounded to fp16
  (exact when representable, else the codes are kept and the rounding error of ``m`` is logged);
  a :class:`~lowbit.nn.BlockMinQLinear` (Q4_1 import) as is;
- Q8_0: any symmetric code of at most 8 bits, or affine ``q - zero_point`` in ``[-128, 127]``.

Anything else (other group sizes, NF4, double-quantized scales, float layers) is dequantized and
requantized with the ``gguf`` package's reference quantizer (``gguf.quants.quantize``), with a
warning for layers that were quantized. The file is written atomically (temp file, fsync,
``os.replace``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.core import Kind, get_format
from lowbit.errors import ConfigError, LoadError
from lowbit.io.atomic import TMP_PREFIX, fsync_dir, fsync_file
from lowbit.io.gguf_blocks import BLOCK, encode_blocks, permute_qk
from lowbit.nn import QEmbedding, WeightOnlyQLinear
from lowbit.nn.gguf_linear import BlockMinQLinear, QTableEmbedding
from lowbit.nn.hadamard import rotation_modules

log = logging.getLogger(__name__)

TARGET_TYPES = ("q4_0", "q4_1", "q8_0")
FLOAT_TYPES = ("f32", "f16")
FILE_TYPE = {"q4_0": 2, "q4_1": 3, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
LAYER_TENSORS = {  # HF Llama submodule -> llama.cpp tensor name (convert_hf_to_gguf / gguf.tensor_mapping)
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
LAYER_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a dependency of the llm extra
        raise ConfigError("GGUF export needs the `gguf` package (pip install gguf)") from None
    return gguf


@dataclass
class ExportReport:
    """Per tensor: how it was written (``exact``, ``exact-codes`` (codes and d kept, m rounded),
    ``requantized``, ``quantized`` (from float), ``float``) and its GGML type."""

    path: str = ""
    qtype: str = ""
    tensors: dict[str, dict] = field(default_factory=dict)

    def count(self, how: str) -> int:
        return sum(1 for t in self.tensors.values() if t["how"] == how)


# ------------------------------------------------------------------------------ grid checks

def _per_block(p: torch.Tensor, n: int, k: int, group_size: int) -> torch.Tensor:
    """A per-group (N, G) or per-channel (N,) parameter as one value per 32-block: (N, K / 32)."""
    if p.dim() == 1 or not group_size:
        return p.reshape(n, 1).expand(n, k // BLOCK)
    return p.repeat_interleave(group_size // BLOCK, dim=1)[:, : k // BLOCK]  # ragged last group cut to K


def on_grid(module: nn.Module, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str] | None:
    """``(codes, d, m, how)`` holding ``module``'s own quantization in ``qtype``'s terms, or None if
    it is not on that grid (rules in the module docstring). ``how`` is ``exact`` or ``exact-codes``."""
    if isinstance(module, BlockMinQLinear):
        if qtype != "q4_1" or module.bits != 4 or module.group_size % BLOCK:
            return None
        n, k = module.out_features, module.in_features
        return (module.codes(), _per_block(module.scale, n, k, module.group_size),
                _per_block(module.offset, n, k, module.group_size), "exact")
    if type(module) is not WeightOnlyQLinear:  # subclasses (double-quantized scales) store scales differently
        return None
    if module.input_scale is not None:  # SINQ: the codes hold W / t; requantize the weight W = dequant diag(t)
        return None
    f = get_format(module.fmt)
    n, k, g = module.out_features, module.in_features, module.group_size
    if f.kind is not Kind.UNIFORM or k % BLOCK or (g and g % BLOCK):
        return None
    codes = module.codes().to(torch.int16)  # (N, K)
    d = _per_block(module.scale, n, k, g)
    lo, hi = int(codes.min()), int(codes.max())
    if module.zero_point is None:
        if qtype == "q4_0" and -8 <= lo and hi <= 7:
            return codes, d, None, "exact"
        if qtype == "q4_1" and -8 <= lo and hi <= 7:
            m = (-8 * d.float()).to(torch.float16)  # a power-of-two multiple: exact unless it overflows
            return ((codes + 8), d, m, "exact") if bool(torch.isfinite(m).all()) else None
        if qtype == "q8_0" and -128 <= lo and hi <= 127:
            return codes, d, None, "exact"
        return None
    if module.zero_point.is_floating_point():  # HQQ's fp16 zero-points: Q4_1's min = -scale * zero_point
        if qtype != "q4_1" or not (0 <= lo and hi <= 15):
            return None
        m = (-d.float() * _per_block(module.zero_point, n, k, g).float()).to(torch.float16)
        return codes, d, m, "exact-codes"
    zp = _per_block(module.zero_point.to(torch.int16), n, k, g)  # (N, K/32)
    zp_cols = zp.repeat_interleave(BLOCK, dim=1)  # (N, K)
    if qtype == "q4_1" and 0 <= lo and hi <= 15:
        m32 = -d.float() * zp.float()
        m = m32.to(torch.float16)
        exact = bool((m.float() == m32).all())
        if not exact:
            err = float((m.float() - m32).abs().max())
            log.warning("q4_1 min = -scale * zero_point is not exact in fp16 (max rounding %.3g): codes and "
                        "scales kept, min rounded", err)
        return codes, d, m, "exact" if exact else "exact-codes"
    if qtype == "q8_0":
        v = codes - zp_cols
        if -128 <= int(v.min()) and int(v.max()) <= 127:
            return v, d, None, "exact"
    return None


def _float_weight(module: nn.Module) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight().detach().float()
    if isinstance(module, (QEmbedding, QTableEmbedding, nn.Embedding)):
        return module.weight.detach().float()
    raise ConfigError(f"cannot export a {type(module).__name__}: it has no dequantized weight")


def tensor_data(module: nn.Module, qtype: str, n_head: int | None = None) -> tuple[np.ndarray, str]:
    """GGML data for ``module``'s (N, K) weight at ``qtype`` and how it was made (see :class:`ExportReport`).

    ``n_head``: permute rows for llama.cpp's rope layout (q/k projections)."""
    gguf = _gguf()
    if qtype in FLOAT_TYPES:
        w = _float_weight(module)
        if n_head:
            w = permute_qk(w, n_head)
        return w.numpy().astype(np.float32 if qtype == "f32" else np.float16), "float"
    view = on_grid(module, qtype)
    if view is not None:
        codes, d, m, how = view
        if n_head:
            codes, d = permute_qk(codes, n_head), permute_qk(d, n_head)
            m = None if m is None else permute_qk(m, n_head)
        return encode_blocks(qtype, codes, d, m), how
    w = _float_weight(module)
    if w.shape[1] % BLOCK:
        raise ConfigError(f"{qtype} needs rows that are multiples of {BLOCK}, got a weight of shape {tuple(w.shape)}")
    if n_head:
        w = permute_qk(w, n_head)
    raw = gguf.quants.quantize(np.ascontiguousarray(w.numpy(), dtype=np.float32), _ggml_type(qtype))
    is_float = isinstance(module, (nn.Linear, nn.Embedding))
    return raw, "quantized" if is_float else "requantized"


def _ggml_type(name: str):
    T = _gguf().GGMLQuantizationType
    return {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q8_0": T.Q8_0, "f32": T.F32, "f16": T.F16}[name]


# ------------------------------------------------------------------------------ metadata

def _add_arch(writer, cfg, qtype: str, name: str) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(name)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads or cfg.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_file_type(FILE_TYPE[qtype])
    writer.add_quantization_version(_gguf().GGML_QUANT_VERSION)


def copy_tokenizer(writer, source: str | Path) -> int:
    """Copy every ``tokenizer.*`` key of the GGUF file ``source`` (values and types as stored)."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(source))
    except (OSError, ValueError) as exc:
        raise LoadError(f"{source}: unreadable GGUF ({exc})") from None
    n = 0
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub)
        n += 1
    return n


def add_hf_tokenizer(writer, tokenizer, vocab_size: int, pre: str = "default") -> None:
    """A byte-level BPE Hugging Face tokenizer as GGUF's ``gpt2`` tokenizer model.

    Tokens in id order (ids the tokenizer lacks up to ``vocab_size`` become ``[PAD{i}]``, type
    UNUSED), token types (CONTROL for special added tokens, USER_DEFINED for other added ones),
    merges, special token ids and the chat template. ``pre`` names llama.cpp's pre-tokenizer; it
    cannot be derived here (llama.cpp's converter identifies it by hashing a tokenization), so pass
    it (``"smollm"`` for SmolLM2). Checked on SmolLM2: with ``pre="smollm"`` every ``tokenizer.*`` key
    equals the one in its GGUF file.
    """
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("GGUF export needs a fast (tokenizers-backed) tokenizer, or source_gguf=")
    tj = json.loads(backend.to_str())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(f"GGUF export supports BPE tokenizers, got {model.get('type')!r}; pass source_gguf=")
    T = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [T.UNUSED] * vocab_size
    for tok, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = tok, T.NORMAL
    for added in tj.get("added_tokens", []):
        i = added["id"]
        if i < vocab_size:
            tokens[i] = added["content"]
            types[i] = T.CONTROL if added.get("special") else T.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        i = getattr(tokenizer, attr, None)
        if isinstance(i, int):
            add(i)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_space_prefix(False)  # byte-level BPE encodes spaces itself
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


# ------------------------------------------------------------------------------ export

def _llama(model: nn.Module) -> nn.Module:
    lm = getattr(model, "lm", model)
    cfg = getattr(lm, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama":
        got = getattr(cfg, "model_type", type(lm).__name__)
        raise ConfigError(f"GGUF export supports Llama causal LMs (model_type 'llama'), got {got!r}")
    return lm


def _tied(lm: nn.Module) -> bool:
    emb, head = lm.model.embed_tokens, lm.lm_head
    if isinstance(emb, QTableEmbedding):
        return head is emb.table
    w = getattr(emb, "weight", None)
    return isinstance(head, nn.Linear) and isinstance(emb, nn.Embedding) and head.weight is w


def export_gguf(model: nn.Module, path: str | Path, qtype: str = "q4_0", *, source_gguf: str | Path | None = None,
                embedding_type: str = "q8_0", tokenizer_pre: str = "default", name: str | None = None,
                overwrite: bool = True) -> ExportReport:
    """Write ``model`` (a lowbit ``CausalLM`` around a Llama, or the Llama itself) to ``path`` as GGUF.

    ``qtype``: the type of the linear layers (``q4_0``, ``q4_1``, ``q8_0``). ``embedding_type``: the
    type of ``token_embd`` (also llama.cpp's output head when tied; ``q8_0`` as in llama.cpp's own
    Q4 files, or ``f16`` / ``f32`` / a target type). ``source_gguf``: copy the tokenizer from this
    file (default: ``model.gguf_source`` if set, e.g. by :func:`lowbit.io.gguf_import.load_gguf`).
    Returns an :class:`ExportReport`; on-grid layers are bit-exact, the others are logged.
    """
    gguf = _gguf()
    if qtype not in TARGET_TYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}; valid: {', '.join(TARGET_TYPES)}")
    if embedding_type not in TARGET_TYPES + FLOAT_TYPES:
        raise ConfigError(f"unknown embedding type {embedding_type!r}; valid: {', '.join(TARGET_TYPES + FLOAT_TYPES)}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists (use --force / overwrite=True to replace it)")
    lm = _llama(model)
    rotated = rotation_modules(lm)
    if rotated:
        raise ConfigError(f"cannot export a QuaRot-rotated model to GGUF: {rotated[0]} rotates online, which "
                          "llama.cpp does not compute (the file would give wrong logits)")
    cfg = lm.config
    source_gguf = source_gguf or getattr(model, "gguf_source", None)
    report = ExportReport(path=str(path), qtype=qtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".gguf", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        _add_arch(writer, cfg, qtype, name or getattr(model, "model_name", None) or "lowbit-llama")
        tokenizer = getattr(model, "tokenizer", None)
        if source_gguf:
            log.info("tokenizer: %d keys copied from %s", copy_tokenizer(writer, source_gguf), source_gguf)
        elif tokenizer is not None:
            add_hf_tokenizer(writer, tokenizer, cfg.vocab_size, tokenizer_pre)
        else:
            log.warning("no tokenizer on the model and no source_gguf: llama.cpp cannot run this file")

        def put(gname: str, module: nn.Module, ttype: str, n_head: int | None = None) -> None:
            data, how = tensor_data(module, ttype, n_head)
            writer.add_tensor(gname, data, raw_dtype=_ggml_type(ttype) if ttype in TARGET_TYPES else None)
            report.tensors[gname] = {"type": ttype, "how": how, "module": type(module).__name__}
            if how == "requantized":
                log.warning("%s (%s): not on the %s grid, dequantized and requantized with gguf's reference "
                            "quantizer", gname, type(module).__name__, qtype)
            elif how == "quantized":
                log.info("%s: float weights quantized to %s with gguf's reference quantizer", gname, ttype)

        def put_vector(gname: str, t: torch.Tensor) -> None:
            writer.add_tensor(gname, t.detach().float().numpy().astype(np.float32))
            report.tensors[gname] = {"type": "f32", "how": "float", "module": "norm"}

        emb = lm.model.embed_tokens
        put("token_embd.weight", emb.table if isinstance(emb, QTableEmbedding) else emb, embedding_type)
        n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        for i, layer in enumerate(lm.model.layers):
            for hf, gn in LAYER_NORMS.items():
                put_vector(f"blk.{i}.{gn}.weight", getattr(layer, hf).weight)
            for hf, gn in LAYER_TENSORS.items():
                mod = layer.get_submodule(hf)
                if getattr(mod, "bias", None) is not None:
                    raise ConfigError(f"layer {i} {hf} has a bias; this exporter writes bias-free Llama linears")
                heads = n_head if gn == "attn_q" else n_kv if gn == "attn_k" else None
                put(f"blk.{i}.{gn}.weight", mod, qtype, heads)
        put_vector("output_norm.weight", lm.model.norm.weight)
        if not _tied(lm):
            put("output.weight", lm.lm_head, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    log.info("wrote %s: %d tensors (%d exact, %d exact codes, %d requantized, %d quantized from float), %.1f MB",
             path, len(report.tensors), report.count("exact"), report.count("exact-codes"),
             report.count("requantized"), report.count("quantized"), path.stat().st_size / 1e6)
    return report


__all__ = ["export_gguf", "ExportReport", "on_grid", "tensor_data", "copy_tokenizer", "add_hf_tokenizer",
           "TARGET_TYPES", "LAYER_TENSORS", "LAYER_NORMS"]
