"""Export a weight-only causal LM as a Hugging Face folder in the compressed-tensors format.

transformers (with the ``compressed-tensors`` package) and vLLM load such a folder directly: its
``config.json`` carries a ``quantization_config`` with ``quant_method: compressed-tensors`` and
``format: pack-quantized``, and each quantized linear ``P`` is stored as

- ``P.weight_packed``: int32 ``(N, ceil(K * bits / 32))``. Codes ``q`` are signed, in
  ``[-2^(bits-1), 2^(bits-1) - 1]``; ``q + 2^(bits-1)`` is written as one dense little-endian bit
  stream per row: element ``k`` occupies bits ``[k * bits, (k + 1) * bits)``, word ``w`` holds bits
  ``[32 w, 32 w + 32)`` (a 3-bit code may straddle two words).
- ``P.weight_scale``: ``(N, K / group_size)`` for ``strategy: group``, ``(N, 1)`` for ``channel``.
- ``P.weight_zero_point`` (asymmetric only): signed zero-points ``(N, groups)`` packed the same way
  along dim 0, i.e. int32 ``(ceil(N * bits / 32), groups)``.
- ``P.weight_shape``: ``[N, K]``.

Dequantization is ``W = (q - z) * scale`` (``z = 0`` when symmetric). lowbit's codes map without
requantizing: symmetric ``intB`` codes are already signed; affine ``uintB`` codes ``u`` and zero-points
``z_u`` both move down by ``2^(bits-1)`` (the difference ``u - z_u`` is unchanged). Refused, with the
reason: codebook formats (NF4), fp16 zero-points (HQQ; compressed-tensors' are integers), and a last
group shorter than ``group_size`` (compressed-tensors requires K divisible by the group size).

Layers sharing (bits, group_size, symmetric) form one ``config_groups`` entry; with one scheme the
target is ``Linear`` and the float linears (e.g. an unquantized head) are listed in ``ignore``.
Everything else (embeddings, norms, float linears) is written as the model holds it; a lowbit int8
``QEmbedding`` is written dequantized (compressed-tensors has no int8 embedding table).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from lowbit.core import Kind, get_format
from lowbit.errors import ConfigError
from lowbit.io.atomic import atomic_dir
from lowbit.nn import WeightOnlyQLinear
from lowbit.nn.base import QMODULES
from lowbit.nn.qembedding import QEmbedding

log = logging.getLogger(__name__)

FORMAT = "pack-quantized"
COMPRESSED_TENSORS_VERSION = "0.20.1"  # the version whose reader the tests run


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (R, C) -> int32 (R, ceil(C * bits / 32)): ``codes + 2^(bits-1)`` as a dense bit stream."""
    rows, cols = codes.shape
    u = codes.to(torch.int64) + (1 << (bits - 1))  # (R, C), in [0, 2^bits)
    pad = (-cols) % 32
    u = torch.nn.functional.pad(u, (0, pad)).reshape(rows, -1, 32)  # (R, G, 32): 32 codes fill `bits` words
    start = torch.arange(32, dtype=torch.int64) * bits  # bit offset of each code inside its group
    word, offset = start // 32, start % 32
    words = torch.zeros(rows, u.shape[1], bits + 1, dtype=torch.int64)  # one spare word for the last carry
    words.scatter_add_(2, word.expand_as(u), (u << offset) & 0xFFFFFFFF)  # disjoint bits: add == or
    words.scatter_add_(2, (word + 1).expand_as(u), u >> (32 - offset))  # the part that straddles a word
    words = words[..., :bits].reshape(rows, -1)[:, : math.ceil(cols * bits / 32)]  # (R, words)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret as two's-complement int32


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 (R, words) -> signed int8 codes (R, cols)."""
    w = packed.to(torch.int64) & 0xFFFFFFFF  # (R, words) as unsigned
    rows = w.shape[0]
    stream = torch.nn.functional.pad(w, (0, math.ceil(cols / 32) * bits + 1 - w.shape[1]))
    start = torch.arange(cols, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    lo = stream[:, word] >> offset
    hi = stream[:, word + 1] << (32 - offset)
    u = (lo | hi) & ((1 << bits) - 1)  # (R, cols)
    return (u - (1 << (bits - 1))).to(torch.int8).reshape(rows, cols)


def _layer_tensors(m: WeightOnlyQLinear, dtype: torch.dtype) -> tuple[dict, dict]:
    """The compressed-tensors tensors of one layer and its weight args (num_bits, strategy, ...)."""
    f = get_format(m.fmt)
    if f.kind is not Kind.UNIFORM:
        raise ConfigError(f"compressed-tensors pack-quantized holds integer codes; {m.fmt} is a {f.kind.value} format")
    if m.zero_point is not None and m.zero_point.is_floating_point():
        raise ConfigError("compressed-tensors zero-points are integers; this layer has fp16 zero-points (HQQ)")
    if getattr(m, "input_scale", None) is not None:
        raise ConfigError("compressed-tensors has no per-input-channel scale; this layer has SINQ's column scales "
                          "(export it as ONNX MatMulNBits or GGUF, which requantizes, or quantize with hqq / rtn)")
    bits, g, k = f.bits, m.group_size, m.in_features
    if g and k % g:
        raise ConfigError(f"compressed-tensors needs in_features divisible by group_size; {k} % {g} != 0 "
                          f"(requantize with a group size dividing {k}, e.g. {math.gcd(k, g)})")
    offset = 0 if f.signed else 1 << (bits - 1)  # unsigned affine codes -> signed
    q = m.codes().to(torch.int32) - offset  # (N, K)
    scale = m.scale.to(dtype)
    scale = scale if g else scale[:, None]  # (N, groups) or (N, 1)
    out = {"weight_packed": pack_int32(q, bits), "weight_scale": scale.contiguous(),
           "weight_shape": torch.tensor([m.out_features, k], dtype=torch.int64)}
    symmetric = m.zero_point is None
    if not symmetric:
        zp = m.zero_point.to(torch.int32) - offset
        zp = zp if g else zp[:, None]  # (N, groups)
        out["weight_zero_point"] = pack_int32(zp.t().contiguous(), bits).t().contiguous()  # packed along N
    if m.bias is not None:
        out["bias"] = m.bias.to(dtype)
    args = {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": g or None,
            "strategy": "group" if g else "channel", "dynamic": False}
    if not symmetric:
        args["zp_dtype"] = "torch.int8"
    return out, args


def quantization_config(schemes: dict[tuple, list[str]], float_linears: list[str]) -> dict:
    """The ``quantization_config`` for layers grouped by weight args; names are module paths in the HF model."""
    groups = {}
    for i, (key, names) in enumerate(sorted(schemes.items(), key=lambda kv: str(kv[0]))):
        args = dict(key)
        targets = ["Linear"] if len(schemes) == 1 else sorted(names)
        groups[f"group_{i}"] = {"targets": targets, "weights": args, "input_activations": None,
                                "output_activations": None, "format": FORMAT}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": sorted(float_linears), "kv_cache_scheme": None,
            "version": COMPRESSED_TENSORS_VERSION}


def export_hf(model: nn.Module, folder: str | Path, overwrite: bool = False) -> dict:
    """Write a weight-only causal LM (lowbit's ``CausalLM``) as a compressed-tensors HF folder, atomically."""
    from safetensors.torch import save_file

    if getattr(model, "task", None) != "causal-lm":
        raise ConfigError(f"--format hf writes causal LMs (task 'causal-lm'); got {type(model).__name__} "
                          f"(task {getattr(model, 'task', None)!r})")
    lm = model.lm
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise ConfigError(f"{folder} exists (use --force / overwrite=True to replace it)")
    dtype = next((p.dtype for p in lm.parameters() if p.is_floating_point()), torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[tuple, list[str]] = {}
    float_linears, unsupported, covered = [], [], set()
    for name, m in lm.named_modules():
        if isinstance(m, WeightOnlyQLinear):
            layer, args = _layer_tensors(m, dtype)
            tensors.update({f"{name}.{k}": v for k, v in layer.items()})
            schemes.setdefault(tuple(sorted(args.items())), []).append(name)
            covered.add(name)
        elif isinstance(m, QEmbedding):
            tensors[f"{name}.weight"] = m.weight.to(dtype).contiguous()  # dequantized int8 table
            covered.add(name)
            log.warning("%s: int8 embedding written dequantized (compressed-tensors has no int8 tables)", name)
        elif isinstance(m, nn.Linear):
            float_linears.append(name)
        elif type(m).__name__ in QMODULES:
            unsupported.append(f"{name} ({type(m).__name__})")
    if unsupported:
        raise ConfigError(f"--format hf writes WeightOnlyQLinear layers; cannot write {', '.join(unsupported[:4])}")
    if not schemes:
        raise ConfigError(f"{type(model).__name__} has no weight-only quantized linears; quantize it first "
                          "(e.g. lowbit quantize --scheme gptq --bits 4 --group-size 64)")
    config = lm.config.to_dict()
    head = getattr(lm, "lm_head", None)
    seen: dict[int, str] = {}
    for key, t in lm.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in covered or any(owner.startswith(c + ".") for c in covered):
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # a tied tensor (head = embedding): stored once, as transformers does
            continue
        seen[ptr] = key
        tensors[key] = t.detach().contiguous()
    if isinstance(head, WeightOnlyQLinear) and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False  # the head is quantized on its own; the embedding stays float
    config["quantization_config"] = quantization_config(schemes, float_linears)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        gen = getattr(lm, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        if getattr(model, "tokenizer", None) is not None:
            model.tokenizer.save_pretrained(str(tmp))
    n_layers = sum(len(v) for v in schemes.values())
    log.info("exported %s: %d pack-quantized linears in %d scheme(s), %d float linears", folder, n_layers,
             len(schemes), len(float_linears))
    return {"path": str(folder), "quantized_linears": n_layers, "schemes": len(schemes),
            "float_linears": float_linears, "bytes": (folder / "model.safetensors").stat().st_size}
