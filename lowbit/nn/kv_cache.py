"""Quantized KV cache, KIVI style (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization
for KV Cache"), plugged into transformers generation through its ``Cache`` interface.

- Keys are quantized **per channel**: for each block of ``group`` consecutive tokens, every (head,
  channel) gets its own affine grid over those tokens (key outliers live in fixed channels).
- Values are quantized **per token**: every (head, token) gets its own grid over its ``head_dim``
  channels (value errors average out in the attention-weighted sum).
- The most recent tokens (between ``residual`` and ``residual + group - 1`` of them) stay in full
  precision; whenever ``group`` tokens have aged past the window they are quantized as one block.
- The first ``sink`` tokens of the sequence stay in full precision for good (the attention sink: Xiao et
  al. 2024, "Efficient Streaming Language Models with Attention Sinks"; kept intact as in Liu et al.
  2024, "IntactKV"): the model parks attention on them and their states are outliers, which in a
  quantized block would widen every channel's key grid. Blocks start after them.

Affine b-bit grid over a range [lo, hi]: ``scale = (hi - lo) / (2^b - 1)``, ``q = round((x - lo) /
scale)``, ``x ~ lo + scale * q``; ``lo`` and ``scale`` are stored in fp16, int4 codes two per byte.
Attention reads the dequantized past (the integer codes are what is held in memory).

``rotate=True`` (QuaRot, Ashkboos et al. 2024): keys and values are quantized in a Hadamard basis,
``Q(k H)`` with ``H = H_d / sqrt(d)`` over the head dim, which spreads a key's outlier channels over
all channels; attention reads ``deq(Q(k H)) H^T``. Since ``H H^T = I`` this is the same product as
QuaRot's online Hadamard on queries and keys after RoPE (``(q H)(deq Q(k H))^T``), done here on the
cached side so the model is unchanged (a fused kernel would rotate the query instead).

:class:`QuantizedKVCache` is the ``Cache`` to pass as ``cache=``; :class:`KVCacheLM` wraps a
``CausalLM`` so that its forward runs the text in chunks through such a cache, which is how
``evaluate`` measures the perplexity / KL effect of the cache.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from lowbit.core import pack, unpack
from lowbit.kernels.hadamard import hadamard_transform, hadamard_transform_t
from lowbit.errors import ConfigError

log = logging.getLogger(__name__)

KV_BITS = (2, 4, 8)
DEFAULT_GROUP = 32  # tokens per key block (KIVI uses 32)
DEFAULT_RESIDUAL = 32  # tokens always kept in full precision (KIVI: 32-128)
# the sequence's first tokens, kept in full precision for good: SmolLM2 parks attention on its first token, whose
# residual stream runs to ~2e4 (others ~1e2); quantized into the first key block, it widens every channel's grid.
# Held-out calibration KL of int4 (bench/kv_cache.py): 0.0065 with none, 0.0015 with 1 (4: no better, scratch run)
DEFAULT_SINK = 1
EVAL_CHUNK = 64  # tokens per forward when evaluating through the cache


def _affine(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8), scale and lo (fp16) of ``x`` with one grid per slice reduced over ``dim``."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).to(torch.float16).float().clamp_min(1e-6)
    lo = lo.to(torch.float16).float()
    q = torch.round((x - lo) / scale).clamp_(0, 2**bits - 1).to(torch.uint8)
    return q, scale.to(torch.float16), lo.to(torch.float16)


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache: quantized blocks of old tokens + a full-precision recent window.

    Held tensors: ``k_codes`` (B, H, T_q, D) packed, ``k_scale`` / ``k_lo`` (B, H, T_q / group, D),
    ``v_codes`` (B, H, T_q, D) packed, ``v_scale`` / ``v_lo`` (B, H, T_q, 1); ``keys`` / ``values`` the
    window (B, H, T_r, D).
    """

    is_croppable = False

    def __init__(self, bits: int = 8, group: int = DEFAULT_GROUP, residual: int = DEFAULT_RESIDUAL,
                 rotate: bool = False, sink: int = DEFAULT_SINK):
        super().__init__()
        if bits not in KV_BITS:
            raise ConfigError(f"KV cache bits must be one of {KV_BITS}, got {bits}")
        if group < 1 or residual < 0 or sink < 0:
            raise ConfigError(f"KV cache needs group >= 1, residual >= 0 and sink >= 0, got group={group}, "
                              f"residual={residual}, sink={sink}")
        self.bits, self.group, self.residual, self.rotate, self.sink = bits, group, residual, rotate, sink
        self.n_quantized = 0
        self._q: dict[str, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.dtype = key_states.dtype  # transformers >= 5.25 no longer sets it on DynamicLayer
        self.shape = key_states.shape[:2] + key_states.shape[3:]  # (B, H, D)
        self.sink_keys, self.sink_values = key_states[..., :0, :], value_states[..., :0, :]  # (B, H, 0, D)

    # ---- storage -----------------------------------------------------------------------------
    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        return q if self.bits == 8 else pack(q.reshape(-1), self.bits)

    def _unpack(self, p: torch.Tensor, tokens: int) -> torch.Tensor:
        b, h, d = self.shape
        if self.bits == 8:
            return p
        return unpack(p, self.bits, (b, h, tokens, d))

    def _append_block(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize ``group`` tokens (B, H, group, D) of keys (per channel) and values (per token)."""
        kq, ks, kl = _affine(k.float(), dim=-2, bits=self.bits)  # grids per (B, H, D) over the block's tokens
        vq, vs, vl = _affine(v.float(), dim=-1, bits=self.bits)  # grids per (B, H, token) over D
        block = {"k_codes": self._pack(kq), "k_scale": ks, "k_lo": kl,
                 "v_codes": self._pack(vq), "v_scale": vs, "v_lo": vl}
        if self._q is None:
            self._q = {name: [t] for name, t in block.items()}
        else:
            for name, t in block.items():
                self._q[name].append(t)
        self.n_quantized += k.shape[-2]

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized past, (B, H, T_q, D) keys and values in the cache dtype."""
        b, h, d = self.shape
        ks, vs = [], []
        for i in range(len(self._q["k_codes"])):
            kq = self._unpack(self._q["k_codes"][i], self.group).float()
            vq = self._unpack(self._q["v_codes"][i], self.group).float()
            ks.append(self._q["k_lo"][i].float() + self._q["k_scale"][i].float() * kq)
            vs.append(self._q["v_lo"][i].float() + self._q["v_scale"][i].float() * vq)
        return torch.cat(ks, dim=-2).to(self.dtype), torch.cat(vs, dim=-2).to(self.dtype)

    # ---- Cache layer interface ---------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new tokens; return all keys/values (dequantized past + full-precision window)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.rotate:  # held in the Hadamard basis (B, H, T, D) @ H_D; returned rotated back below
            key_states, value_states = hadamard_transform(key_states), hadamard_transform(value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        take = min(self.sink - self.sink_keys.shape[-2], self.keys.shape[-2])
        if take > 0:  # the sequence's first tokens stay full precision for good
            self.sink_keys = torch.cat([self.sink_keys, self.keys[..., :take, :]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, self.values[..., :take, :]], dim=-2)
            self.keys, self.values = self.keys[..., take:, :], self.values[..., take:, :]
        parts_k, parts_v = [self.sink_keys], [self.sink_values]
        if self._q is not None:
            old_k, old_v = self._dequantized()
            parts_k.append(old_k)
            parts_v.append(old_v)
        full_k = torch.cat([*parts_k, self.keys], dim=-2)  # (B, H, T, D): sink, quantized past, window
        full_v = torch.cat([*parts_v, self.values], dim=-2)
        while self.keys.shape[-2] - self.residual >= self.group:  # the oldest window tokens age out
            g = self.group
            self._append_block(self.keys[..., :g, :], self.values[..., :g, :])
            self.keys, self.values = self.keys[..., g:, :], self.values[..., g:, :]
        if self.rotate:
            full_k, full_v = hadamard_transform_t(full_k), hadamard_transform_t(full_v)
        return full_k, full_v

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[-2] + self.n_quantized + self.keys.shape[-2]

    def reset(self) -> None:
        super().reset()
        self.n_quantized = 0
        self._q = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ConfigError("the quantized KV cache does not support beam search; use greedy or sampling")

    def nbytes(self) -> int:
        """Bytes held: codes, scales and lows of the quantized blocks plus the full-precision window and sink."""
        n = 0 if not self.is_initialized else (self.keys.nbytes + self.values.nbytes + self.sink_keys.nbytes
                                               + self.sink_values.nbytes)
        if self._q is not None:
            n += sum(t.nbytes for ts in self._q.values() for t in ts)
        return n


class QuantizedKVCache(Cache):
    """A ``transformers`` cache with one :class:`QuantizedKVLayer` per decoder layer.

    ``model.generate(ids, cache=QuantizedKVCache(model.config, bits=4))`` or any forward
    with ``cache=`` and ``use_cache=True`` (transformers >= 5.25; ``past_key_values=`` is deprecated).
    """

    def __init__(self, config, bits: int = 8, group: int = DEFAULT_GROUP, residual: int = DEFAULT_RESIDUAL,
                 rotate: bool = False, sink: int = DEFAULT_SINK):
        cfg = config.get_text_config(decoder=True)
        layers = [QuantizedKVLayer(bits, group, residual, rotate, sink) for _ in range(cfg.num_hidden_layers)]
        super().__init__(layers=layers)
        self.bits, self.rotate = bits, rotate

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def fp_cache_nbytes(cache: Cache) -> int:
    """Bytes of an unquantized transformers cache (keys + values of every layer)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


def make_cache(config, kv: str | None, sink: int = DEFAULT_SINK):
    """``None``/``"fp"`` -> a plain DynamicCache; ``"int8"``/``"int4"``/``"int2"`` -> QuantizedKVCache;
    a ``-rot`` suffix (``"int4-rot"``) quantizes keys and values in the Hadamard basis (``rotate=True``);
    ``sink``: the first tokens kept in full precision."""
    from transformers import DynamicCache

    if kv in (None, "fp", "fp32", "none"):
        return DynamicCache(config=config)
    name = str(kv)
    rotate = name.endswith("-rot")
    bits = {"int8": 8, "int4": 4, "int2": 2}.get(name.removesuffix("-rot"))
    if bits is None:
        raise ConfigError(f"unknown KV cache format {kv!r}; valid: int8, int4, int2, each optionally with -rot "
                          "(Hadamard-rotated keys/values), or none")
    if rotate:
        cfg = config.get_text_config(decoder=True)
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        from lowbit.core.hadamard import split_order

        split_order(d)  # a clear error when no Hadamard matrix of the head dim is known
    return QuantizedKVCache(config, bits, rotate=rotate, sink=sink)


class KVCacheLM(nn.Module):
    """A causal LM whose forward feeds the tokens in chunks of ``chunk`` through a (quantized) KV cache,
    so later tokens attend to the cached, quantized past. Same interface as ``CausalLM``."""

    task = "causal-lm"

    def __init__(self, model: nn.Module, kv: str | None, chunk: int = EVAL_CHUNK, sink: int = DEFAULT_SINK):
        super().__init__()
        if getattr(model, "task", None) != "causal-lm" or not hasattr(model, "lm"):
            raise ConfigError(f"--kv-cache applies to causal LMs (smollm2), not {getattr(model, 'model_name', model)!r}")
        make_cache(model.lm.config, kv, sink)  # validates kv
        self.model = model
        self.kv, self.chunk, self.sink = kv, chunk, sink
        self.tokenizer = model.tokenizer
        self.model_name = getattr(model, "model_name", type(model).__name__)
        self.lowbit_scheme = f"{getattr(model, 'lowbit_scheme', 'fp32')}+kv-{kv or 'fp'}"
        if hasattr(model, "lowbit_fp32_numel"):
            self.lowbit_fp32_numel = model.lowbit_fp32_numel
        self.last_cache = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        lm = self.model.lm
        cache = make_cache(lm.config, self.kv, self.sink)
        logits = []
        for start in range(0, input_ids.shape[-1], self.chunk):
            ids = input_ids[:, start:start + self.chunk]  # (B, C)
            out = lm(input_ids=ids, cache=cache, use_cache=True)
            logits.append(out.logits)
        self.last_cache = cache
        return torch.cat(logits, dim=1)  # (B, T, V)


def kv_bytes_per_token(config, bits: int | None, tokens: int = 512, group: int = DEFAULT_GROUP,
                       residual: int = DEFAULT_RESIDUAL, sink: int = DEFAULT_SINK) -> float:
    """Bytes per cached token around ``tokens`` tokens: the mean over lengths ``tokens .. tokens + group - 1``
    (one block period, so where the full-precision window happens to stand does not decide the figure),
    measured by filling one layer's cache with random states and scaling by the layer count."""
    cfg = config.get_text_config(decoder=True)
    heads = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if bits is None:
        return 2 * cfg.num_hidden_layers * heads * d * 4.0  # fp32 keys and values
    layer = QuantizedKVLayer(bits, group, residual, sink=sink)
    k = torch.randn(1, heads, tokens + group - 1, d)
    layer.update(k[..., :tokens, :], k[..., :tokens, :])
    per_token = [layer.nbytes() / tokens]
    for t in range(tokens, tokens + group - 1):  # one more token at a time
        layer.update(k[..., t:t + 1, :], k[..., t:t + 1, :])
        per_token.append(layer.nbytes() / (t + 1))
    return cfg.num_hidden_layers * sum(per_token) / len(per_token)


__all__ = ["QuantizedKVLayer", "QuantizedKVCache", "KVCacheLM", "make_cache", "kv_bytes_per_token",
           "fp_cache_nbytes", "KV_BITS"]
