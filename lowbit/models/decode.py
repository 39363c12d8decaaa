"""A lean decoder for Llama-layout causal LMs: static KV cache, fused projections, block GEMV kernels.

Hugging Face ``generate`` spends much of each token in Python (logits processors, cache objects,
per-module hooks and dispatch). :class:`Decoder` runs the same arithmetic as the model's forward
for the families whose layer is the Llama block (``llama``, ``mistral``, ``qwen2``):

    h = E[ids]
    per layer:  x = rms(h) ;  q, k, v = x W_qkv^T (+ b) ;  q, k = rope(q, k, pos)
                K[pos] = k ;  V[pos] = v ;  h = h + softmax(q K^T / sqrt(d) + causal) V  W_o^T
                x = rms(h) ;  g, u = x W_gu^T ;  h = h + (silu(g) * u) W_d^T
    logits = rms(h) W_head^T

with the cache allocated in a few doublings up to ``max_len`` positions (no per-token allocation), q/k/v and
gate/up each computed as one product over the concatenated rows, and every 4- or 8-bit linear run
through :mod:`lowbit.kernels.block_gemv` (single tokens: codes read once per token) or, for prompts
and batches, :mod:`lowbit.kernels.block_gemm` (weight tiles unpacked once per call and reused by
every row; no dequantized copy of the weights). A tied
quantized head doubles as the embedding table (rows unpacked on lookup). SINQ's per-input-channel scales
(``WeightOnlyQLinear.input_scale``) are applied to the input first, ``W_p (t_p * x)`` for each part ``p`` of a
fused product. Linears the block kernels cannot take (other formats, fp32) run as the model's own modules.

``Decoder.generate`` is greedy or samples (temperature / top-p, seeded); ``Decoder.logits`` gives
the full-sequence logits that the tests compare with the model's own forward.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import ConfigError
from lowbit.kernels import block_gemm, block_gemv, prompt_attention
from lowbit.kernels.hadamard import hadamard_transform

log = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2")
INITIAL_CAPACITY = 256  # KV-cache positions allocated first; doubled on demand up to max_len
MAX_PARTS = 4  # parts of a fused product with input scales (the C step's record holds this many row counts)


# ------------------------------------------------------------------------------------ linears

@dataclass
class BlockWeights:
    """One linear in the block-kernel layout: ``W = s u + b`` per group (see :mod:`lowbit.kernels.block_gemv`)."""

    packed: torch.Tensor  # uint8 (N, K/2) for 4 bits, (N, K) for 8
    s: torch.Tensor  # fp16 (N, G), the module's own scales
    b: torch.Tensor | None  # fp32 (N, G); None for symmetric codes: b = -2^(bits-1) s, not stored
    bits: int
    group_size: int  # 0 = the whole row
    in_features: int
    bias: torch.Tensor | None
    int8_activations: bool = False  # W4A8 decoding: x rounded to int8 per block of 32 (ggml's Q8_0)
    # SINQ's per-input-channel scales t (WeightOnlyQLinear.input_scale): fp32 (P, K), one row per part of a fused
    # product (``parts``: each part's output rows); part p computes W_p (t_p * x). None: no input scales.
    input_scale: torch.Tensor | None = None
    parts: tuple[int, ...] = ()
    _views: list | None = field(default=None, repr=False, compare=False)  # the parts' views, built on first use

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is None:
            return self._apply(x)
        return torch.cat([part._apply(x * t) for part, t in zip(self._part_views(), self.input_scale)], dim=-1)

    def _part_views(self) -> list["BlockWeights"]:
        """Each part as a BlockWeights over its rows (views of this one's tensors), no input scale."""
        if self._views is not None:
            return self._views
        views, r0 = [], 0
        for n in self.parts or (self.out_features,):
            sl = slice(r0, r0 + n)
            views.append(BlockWeights(self.packed[sl], self.s[sl], None if self.b is None else self.b[sl], self.bits,
                                      self.group_size, self.in_features,
                                      None if self.bias is None else self.bias[sl], self.int8_activations))
            r0 += n
        self._views = views
        return views

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.int8_activations and self.bits == 4:  # W4A8 for every input, prompts included
            if rows >= block_gemm.A8_MIN_ROWS:  # prompts, batches: the register-tiled GEMM
                return block_gemm.block_gemm_a8(x, self.packed, self.s, self.b, self.bits, self.group_size, self.bias)
            return block_gemv.block_linear_a8(x, self.packed, self.s, self.b, self.bits, self.group_size, self.bias)
        if rows >= block_gemm.F32_MIN_ROWS:  # prompts, batches: weight tiles dequantized once, reused by every row
            return block_gemm.block_gemm(x, self.packed, self.s, self.b, self.bits, self.group_size, self.bias)
        return block_gemv.block_linear(x, self.packed, self.s, self.b, self.bits, self.group_size, self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            raise ConfigError("rows of a table with input scales are not its embedding rows")
        return block_gemv.block_rows(ids, self.packed, self.s, self.b, self.bits, self.in_features, self.group_size)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.s, self.b, self.bias, self.input_scale)
                   if t is not None)


def block_weights(module: nn.Module) -> BlockWeights | None:
    """The block layout of a quantized linear, or None when the kernels cannot take it."""
    from lowbit.core import Kind, get_format
    from lowbit.nn.gguf_linear import BlockMinQLinear
    from lowbit.nn.qlinear import WeightOnlyQLinear

    bias = None if getattr(module, "bias", None) is None else module.bias.detach().float().contiguous()
    if isinstance(module, BlockMinQLinear):
        if block_gemv.check_layout(module.bits, module.in_features, module.group_size):
            return None
        u = module.codes().to(torch.uint8)
        s, b = module.scale.half(), module.offset.float()
        return BlockWeights(block_gemv.pack_codes(u, module.bits), s.contiguous(), b.contiguous(), module.bits,
                            module.group_size, module.in_features, bias)
    if not isinstance(module, WeightOnlyQLinear):
        return None
    f = get_format(module.fmt)
    if f.kind is not Kind.UNIFORM or f.bits not in (4, 8):
        return None
    if block_gemv.check_layout(f.bits, module.in_features, module.group_size):
        return None
    q = module.codes()
    qp = module.qparams()
    offset = 2 ** (f.bits - 1) if q.dtype == torch.int8 else 0  # signed codes are stored as u = q + offset
    u = (q.to(torch.int16) + offset).to(torch.uint8)
    s = module.scale.reshape(module.out_features, -1).contiguous()  # fp16 (N, G); per channel: G = 1
    if qp.zero_point is None and offset:  # symmetric: b = -offset s is implied, not stored (fewer bytes per token)
        b = None
    else:
        zp = torch.zeros(s.shape) if qp.zero_point is None else qp.zero_point.float().reshape(s.shape)
        b = (-s.float() * (zp + offset)).contiguous()  # W = s (q - zp) = s u - s (offset + zp)
    t = None if module.input_scale is None else module.input_scale.float().reshape(1, -1).contiguous()  # (1, K)
    return BlockWeights(block_gemv.pack_codes(u, f.bits), s, b, f.bits, module.group_size, module.in_features, bias,
                        input_scale=t, parts=() if t is None else (module.out_features,))


def fuse(parts: list[BlockWeights]) -> BlockWeights | None:
    """Concatenate linears over the same input along their outputs (one kernel call), if compatible."""
    first = parts[0]
    if any(p.bits != first.bits or p.group_size != first.group_size or p.in_features != first.in_features
           for p in parts):
        return None
    biases = [p.bias for p in parts]
    bias = None
    if any(bb is not None for bb in biases):
        bias = torch.cat([bb if bb is not None else torch.zeros(p.out_features) for bb, p in zip(biases, parts)])
    b = None  # implied offsets stay implied only when every part has them
    if any(p.b is not None for p in parts):
        c = block_gemv.offset_constant(first.bits)
        b = torch.cat([p.b if p.b is not None else p.s.float() * c for p in parts]).contiguous()
    t, sizes = None, ()
    if any(p.input_scale is not None for p in parts):  # one row of input scales per part (ones where it has none)
        t = torch.cat([p.input_scale if p.input_scale is not None else torch.ones(1, p.in_features)
                       for p in parts]).contiguous()  # (P, K)
        sizes = tuple(p.out_features for p in parts)
        if len(sizes) > MAX_PARTS:
            return None
    return BlockWeights(torch.cat([p.packed for p in parts]), torch.cat([p.s for p in parts]).contiguous(),
                        b, first.bits, first.group_size, first.in_features, bias, input_scale=t, parts=sizes)


class _Projection:
    """Several linears over one input, as one fused block product when possible, else one call each."""

    def __init__(self, modules: list[nn.Module], int8_activations: bool = False):
        blocks = [block_weights(m) for m in modules]
        self.sizes = [m.out_features for m in modules]
        self.fused = fuse(blocks) if all(b is not None for b in blocks) else None
        if self.fused is not None:
            self.fused.int8_activations = int8_activations
        self.calls: list[Callable] = [] if self.fused is not None else [
            b if b is not None else m for b, m in zip(blocks, modules)]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fused is not None:
            return list(self.fused(x).split(self.sizes, dim=-1))
        return [f(x).float() for f in self.calls]

    def joint(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused product's whole output (..., sum(sizes)), or None when the parts run apart."""
        return self.fused(x) if self.fused is not None else None

    @property
    def uses_kernel(self) -> bool:
        return self.fused is not None

    def nbytes(self) -> int:
        return self.fused.nbytes() if self.fused is not None else 0


# ------------------------------------------------------------------------------------ decoder

def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class Decoder:
    """Static-cache decoding of a Llama-layout causal LM (``CausalLM`` wrapper or bare HF model).

    The decoder reads the model's modules once (derived kernel layouts; the model itself is not
    changed; it keeps no reference to it, so deleting the model afterwards leaves only the derived
    layouts, the norms and what runs as modules in memory) and keeps an fp32 KV cache for ``batch`` sequences that grows by doubling (from 256
    positions) up to ``max_len``, so memory follows the context used. Single tokens of
    one sequence (decoding) go through the one-call C step of :mod:`lowbit.kernels.decode_step`
    when every projection is on the block kernels (``kernel="reference"`` keeps this module's torch
    forward, the step's reference twin); prompts and batches run the torch forward.

    ``activations="int8"`` runs the 4-bit projections as W4A8 (prompts included): each activation row is rounded to int8 per block of 32 (as
    llama.cpp does for its Q4 dot products) and the code products are summed as integers, about
    twice the fp32 kernel's speed on AVX2. That changes the arithmetic (``bench/smollm2.py``
    reports its perplexity); the default ``"fp32"`` computes exactly the model's weight-only math.
    """

    def __init__(self, model: nn.Module, max_len: int = 2048, batch: int = 1, activations: str = "fp32",
                 kernel: str = "auto"):
        from lowbit.core.hadamard import small_factor, split_order
        from lowbit.models.adapters import backbone
        from lowbit.nn.hadamard import HadamardMLP, RotatedRMSNorm, rotation_modules

        lm = backbone(model)
        cfg = getattr(lm, "config", None)
        family = getattr(cfg, "model_type", None)
        if family not in FAMILIES:
            raise ConfigError(f"the fast decoder runs {', '.join(FAMILIES)} models, not {family!r}; "
                              "use the model's own generate()")
        if activations not in ("fp32", "int8"):
            raise ConfigError(f"activations must be 'fp32' or 'int8', got {activations!r}")
        a8 = activations == "int8"
        self.activations = activations
        if max_len < 1 or batch < 1:
            raise ConfigError(f"max_len and batch must be >= 1, got {max_len}, {batch}")
        self.cfg = cfg  # no reference to the model itself: `del model` frees what the decoder does not use
        self.tokenizer = getattr(model, "tokenizer", None)
        inner = lm.model
        self.eps = float(cfg.rms_norm_eps)
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_len, self.batch = max_len, batch
        # QuaRot's online Hadamards: before down_proj (HadamardMLP) and around a tied head's final norm
        # (RotatedRMSNorm) run here; any other online rotation is refused
        allowed = {f"model.layers.{i}.mlp" for i, layer in enumerate(inner.layers)
                   if isinstance(layer.mlp, HadamardMLP)}
        allowed |= {"model.norm"} if isinstance(inner.norm, RotatedRMSNorm) else set()
        rotated = [n for n in rotation_modules(lm) if n not in allowed]
        if rotated:
            raise ConfigError(f"the fast decoder does not run this online rotation ({rotated[0]}); use the model's "
                              "own forward / generate()")
        self.layers = []
        for layer in inner.layers:
            at, mlp = layer.self_attn, layer.mlp
            hm = None
            if isinstance(mlp, HadamardMLP):
                if getattr(mlp, "hidden_act", "silu") != "silu":
                    raise ConfigError(f"the fast decoder's MLP is SiLU-gated, not {mlp.hidden_act!r}")
                m, _ = split_order(mlp.down_proj.in_features)
                hm = small_factor(m).float().contiguous()  # (m, m) +-1: H_I = H_m kron H_p
            self.layers.append({
                "down_hm": hm,
                "in_norm": layer.input_layernorm.weight.detach().float(),
                "post_norm": layer.post_attention_layernorm.weight.detach().float(),
                "qkv": _Projection([at.q_proj, at.k_proj, at.v_proj], a8),
                "o": _Projection([at.o_proj], a8),
                "gate_up": _Projection([mlp.gate_proj, mlp.up_proj], a8),
                "down": _Projection([mlp.down_proj], a8),
            })
        self.final_norm = inner.norm.weight.detach().float()
        self._rotated_norm = inner.norm if isinstance(inner.norm, RotatedRMSNorm) else None
        self.head = _Projection([lm.lm_head], a8)
        self.embed = self._embedding(inner.embed_tokens, lm.lm_head)
        rot = inner.rotary_emb
        pos = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(pos, rot.inv_freq.float())  # (max_len, head_dim / 2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_len, head_dim)
        scaling = float(getattr(rot, "attention_scaling", 1.0))
        self.cos, self.sin = emb.cos() * scaling, emb.sin() * scaling
        self.capacity = min(max_len, INITIAL_CAPACITY)
        shape = (len(self.layers), batch, self.n_kv, self.capacity, self.head_dim)
        self.k_cache, self.v_cache = torch.zeros(shape), torch.zeros(shape)
        self.hidden, self.inter = cfg.hidden_size, cfg.intermediate_size
        self._step = self._build_step(kernel)
        self._attention_kernel = kernel != "reference"  # prompts: prompt_attention's C kernel (SDPA is its twin)
        kernel_layers = sum(p.uses_kernel for L in self.layers for p in (L["qkv"], L["o"], L["gate_up"], L["down"]))
        log.info("decoder: %d layers, %d of %d projections on the block kernels, head %s, cache %d x %d",
                 len(self.layers), kernel_layers, 4 * len(self.layers),
                 "block" if self.head.uses_kernel else "module", batch, max_len)

    def fork(self) -> "Decoder":
        """A decoder sharing this one's weights (kernel layouts, norms, rotary tables) with an empty KV
        cache and scratch of its own: concurrent generations each decode on a fork."""
        new = copy.copy(self)
        new.capacity = min(self.max_len, INITIAL_CAPACITY)
        shape = (len(self.layers), self.batch, self.n_kv, new.capacity, self.head_dim)
        new.k_cache, new.v_cache = torch.zeros(shape), torch.zeros(shape)
        if self._step is not None:
            new._scratch, new._qscratch = torch.zeros_like(self._scratch), torch.zeros_like(self._qscratch)
            new._step = (self._step[0], new._records())
        return new

    def _build_step(self, kernel: str):
        """The one-call C step for single tokens (:mod:`lowbit.kernels.decode_step`), when every
        projection is on the block kernels and the library builds; else None (torch path)."""
        from lowbit.kernels import decode_step

        if kernel not in ("auto", "fast", "reference"):
            raise ConfigError(f"kernel must be auto, fast or reference, got {kernel!r}")
        if kernel == "reference":
            return None
        projections = [L[k] for L in self.layers for k in ("qkv", "o", "gate_up", "down")]
        why = "" if all(p.uses_kernel for p in projections) else "some projections are not 4/8-bit block layouts"
        lib, why = (None, why) if why else decode_step.library()
        if lib is None:
            if kernel == "fast":
                raise ConfigError(f"the C decoding step is unavailable: {why}")
            log.info("decoder: torch forward for every token (%s)", why)
            return None
        n = decode_step.scratch_floats(self.hidden, self.inter, self.n_heads, self.n_kv, self.head_dim, self.max_len)
        self._scratch = torch.zeros(n)
        self._qscratch = torch.zeros(max(self.hidden, self.inter), dtype=torch.int8)
        return lib, self._records()

    def _records(self):
        """The C records of every layer (projections, norms, this cache's pointers)."""
        from lowbit.kernels import decode_step

        records = []
        for i, L in enumerate(self.layers):
            rec = [L["in_norm"].data_ptr(), L["post_norm"].data_ptr()]
            for key in ("qkv", "o", "gate_up", "down"):
                w = L[key].fused
                rec.append(decode_step.proj_record(w.packed, w.s, w.b, w.bias, w.bits, w.in_features, w.group_size,
                                                   w.input_scale, w.parts))
            rec += [self.k_cache[i, 0].data_ptr(), self.v_cache[i, 0].data_ptr()]
            hm = L["down_hm"]
            rec += [None if hm is None else hm.data_ptr(), 0 if hm is None else hm.shape[0]]
            records.append(decode_step.Layer(*rec))
        return (decode_step.Layer * len(records))(*records)

    def _reserve(self, end: int) -> None:
        """Grow the KV cache (doubling, at most max_len positions) so that it holds ``end`` positions."""
        if end <= self.capacity:
            return
        new = min(self.max_len, max(end, 2 * self.capacity))
        old_k, old_v = self.k_cache, self.v_cache
        shape = (*old_k.shape[:3], new, self.head_dim)
        self.k_cache, self.v_cache = torch.zeros(shape), torch.zeros(shape)
        self.k_cache[:, :, :, :self.capacity] = old_k
        self.v_cache[:, :, :, :self.capacity] = old_v
        self.capacity = new
        if self._step is not None:
            self._step = (self._step[0], self._records())

    def _token_step(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """Hidden state (1, 1, H) after every layer for one token, through the C step."""
        lib, layers = self._step
        h = self.embed(ids).reshape(self.hidden).float().contiguous()  # (H,), updated in place
        lib.lowbit_llama_token(layers, len(layers), h.data_ptr(), pos, self.cos.data_ptr(), self.sin.data_ptr(),
                               self.hidden, self.inter, self.n_heads, self.n_kv, self.head_dim, self.capacity, self.eps,
                               int(self.activations == "int8"), self._scratch.data_ptr(), self._qscratch.data_ptr(),
                               torch.get_num_threads())
        return h.view(1, 1, self.hidden)

    def _embedding(self, emb: nn.Module, head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        from lowbit.nn.gguf_linear import QTableEmbedding

        if isinstance(emb, QTableEmbedding):
            table = self.head.fused if emb.table is head and self.head.fused is not None else block_weights(emb.table)
            if table is not None and table.input_scale is None:
                return table.rows
        return lambda ids: emb(ids).float()

    # ---- one forward over new tokens --------------------------------------------------------
    def _rope(self, x: torch.Tensor, pos: int, t: int) -> torch.Tensor:
        """x (B, heads, T, hd) -> x cos + rotate_half(x) sin (a new tensor; q and k go through it together)."""
        cos, sin = self.cos[pos:pos + t], self.sin[pos:pos + t]  # (T, head_dim)
        half = self.head_dim // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x * cos).addcmul_(rot, sin)

    def forward(self, ids: torch.Tensor, pos: int, all_logits: bool = False) -> torch.Tensor:
        """Logits for ``ids`` (B, T) placed at positions ``pos .. pos + T - 1`` of the cache
        (earlier positions must hold this sequence's keys/values). Returns (B, vocab) for the last
        token, or (B, T, vocab) with ``all_logits``."""
        bsz, t = ids.shape
        if bsz > self.batch or pos + t > self.max_len:
            raise ConfigError(f"{bsz} x {pos + t} positions exceed the decoder's cache of {self.batch} x {self.max_len}")
        self._reserve(pos + t)
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        if self._step is not None and bsz == 1 and t == 1:
            h = self._token_step(ids, pos)
            logits = self.head(self._final(h))[0]  # (1, 1, vocab)
            return logits if all_logits else logits[:, 0]
        h = self.embed(ids)  # (B, T, H)
        end = pos + t
        mask, causal = None, False
        if t > 1 and pos == 0:  # a prompt from an empty cache: plain causal attention
            causal = True
        elif t > 1:  # causal within the new tokens; all earlier positions visible
            mask = torch.ones(t, end, dtype=torch.bool).tril(diagonal=pos)
        for i, L in enumerate(self.layers):
            x = _rms(h, L["in_norm"], self.eps)
            qkv = L["qkv"].joint(x)  # (B, T, (nh + 2 nkv) hd) when fused, else None
            if qkv is not None:  # rope over q and k in one pass: they are adjacent columns
                qk = self._rope(qkv[..., :(nh + nkv) * hd].view(bsz, t, nh + nkv, hd).transpose(1, 2), pos, t)
                q, k = qk[:, :nh], qk[:, nh:]  # (B, nh, T, hd), (B, nkv, T, hd)
                v = qkv[..., (nh + nkv) * hd:]
            else:
                q, k, v = L["qkv"](x)
                q = self._rope(q.view(bsz, t, nh, hd).transpose(1, 2), pos, t)  # (B, nh, T, hd)
                k = self._rope(k.view(bsz, t, nkv, hd).transpose(1, 2), pos, t)  # (B, nkv, T, hd)
            kc, vc = self.k_cache[i, :bsz], self.v_cache[i, :bsz]
            kc[:, :, pos:end] = k
            vc[:, :, pos:end] = v.view(bsz, t, nkv, hd).transpose(1, 2)
            if self._attention_kernel:  # C causal GQA attention, output already (B, T, nh * hd)
                a = prompt_attention.causal_attention(q, kc[:, :, :end], vc[:, :, :end], pos)
            else:
                a = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=mask, is_causal=causal,
                                                   enable_gqa=nh != nkv).transpose(1, 2).reshape(bsz, t, nh * hd)
            h = h + L["o"](a)[0]
            x = _rms(h, L["post_norm"], self.eps)
            g, u = L["gate_up"](x)
            x = F.silu(g).mul_(u)
            h = h + L["down"](x if L["down_hm"] is None else hadamard_transform(x))[0]
        if not all_logits:
            h = h[:, -1:]
        logits = self.head(self._final(h))[0]
        return logits if all_logits else logits[:, 0]

    def _final(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm: RMSNorm, or a rotated model's RotatedRMSNorm (its weight in the unrotated basis)."""
        if self._rotated_norm is not None:
            return self._rotated_norm(h)
        return _rms(h, self.final_norm, self.eps)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits (B, T, vocab) from an empty cache (the comparison with the model's forward)."""
        with torch.inference_mode():
            return self.forward(ids, 0, all_logits=True)

    # ---- generation -------------------------------------------------------------------------
    def stream(self, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, eos_token_id: int | None = None) -> Iterator[int]:
        """Yield new token ids one at a time for one prompt ``ids`` (1, T) (greedy when temperature = 0)."""
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise ConfigError(f"stream() takes one prompt of shape (1, T >= 1), got {tuple(ids.shape)}")
        if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
            raise ConfigError("max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1 are required")
        if ids.shape[1] + max_new_tokens > self.max_len:
            raise ConfigError(f"prompt {ids.shape[1]} + {max_new_tokens} new tokens exceed max_len {self.max_len}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.inference_mode():
            logits = self.forward(ids, 0)
            pos = ids.shape[1]
            for _ in range(max_new_tokens):
                token = _pick(logits[0], temperature, top_p, gen)
                yield token
                if eos_token_id is not None and token == eos_token_id:
                    return
                logits = self.forward(torch.tensor([[token]]), pos)
                pos += 1

    def generate(self, ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Prompt + new tokens (1, T + n), like HF ``generate`` with ``do_sample`` off by default."""
        new = list(self.stream(ids, max_new_tokens, **kwargs))
        return torch.cat([ids, torch.tensor([new], dtype=ids.dtype)], dim=1)

    def timed_generate(self, ids: torch.Tensor, max_new_tokens: int) -> dict:
        """Greedy generation with prefill and decode timed apart (seconds, tokens/s)."""
        start = time.perf_counter()
        it = self.stream(ids, max_new_tokens)
        first = next(it)
        t_first = time.perf_counter()
        n = 1 + sum(1 for _ in it)
        end = time.perf_counter()
        return {"prefill_s": t_first - start, "decode_tps": (n - 1) / (end - t_first) if n > 1 else 0.0,
                "tokens": n, "first": first}

    def nbytes(self) -> int:
        """Bytes of the derived kernel layouts (beside the model's own stored weights)."""
        projections = [p for L in self.layers for p in (L["qkv"], L["o"], L["gate_up"], L["down"])] + [self.head]
        return sum(p.nbytes() for p in projections)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """Greedy (temperature 0) or nucleus sampling (Holtzman et al. 2020) from one row of logits."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # the smallest prefix with mass >= top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
