"""Any local Hugging Face model folder as a lowbit task model, offline.

``load_hf(path)`` reads ``config.json``; the family (``model_type``) picks the task from
:mod:`lowbit.models.adapters` (an unknown family falls back on the config's ``architectures``: a
``*ForCausalLM`` is a causal LM, anything else an encoder). A sentence-transformers folder
(``modules.json``) keeps its pooling (``1_Pooling/config.json``), normalisation and
``max_seq_length``; a plain encoder folder gets mean pooling and L2 normalisation.

``build_hf(folder, wrapper)`` is the same architecture with parameters on the ``meta`` device (no
memory, no initialisation): ``lowbit.load`` fills it from a saved folder. Buffers that are not saved
(rotary frequencies, position ids) are computed on the CPU as usual.

GPT-2's ``Conv1D`` (``y = x W + b`` with ``W`` stored (in, out)) becomes an ``nn.Linear`` with the
transposed weight, so every projection of every family is an ``nn.Linear``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import ConfigError, LoadError
from lowbit.models.adapters import ADAPTERS
from lowbit.models.causal_lm import CausalLM
from lowbit.models.encoder import SentenceEncoder

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LENGTH = 512  # plain encoder folders: capped further by the position table and tokenizer


def is_model_path(name: str) -> bool:
    """True when ``name`` points at a folder or a file (rather than a bundled model's short name)."""
    p = Path(name)
    return p.is_dir() or p.is_file() or "/" in name or name.endswith(".gguf")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable JSON ({exc})") from None


def task_of(config: dict) -> str:
    """``"causal-lm"`` or ``"encoder"`` from a config.json dict."""
    row = ADAPTERS.get(config.get("model_type", ""))
    if row is not None:
        return row.task
    archs = config.get("architectures") or []
    return "causal-lm" if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs) else "encoder"


def _st_settings(folder: Path) -> dict:
    """Pooling, normalisation and max_seq_length of a sentence-transformers folder (defaults otherwise)."""
    out = {"pooling": "mean", "normalize": True, "max_seq_length": None}
    modules = folder / "modules.json"
    if not modules.is_file():
        return out
    entries = _read_json(modules)
    out["normalize"] = any(str(e.get("type", "")).endswith("Normalize") for e in entries)
    for e in entries:
        if str(e.get("type", "")).endswith("Pooling"):
            cfg = folder / e.get("path", "") / "config.json"
            if cfg.is_file():
                p = _read_json(cfg)
                out["pooling"] = ("cls" if p.get("pooling_mode_cls_token") else
                                  "max" if p.get("pooling_mode_max_tokens") else "mean")
    st_cfg = folder / "sentence_bert_config.json"
    if st_cfg.is_file():
        out["max_seq_length"] = _read_json(st_cfg).get("max_seq_length")
    return out


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace transformers' ``Conv1D`` modules by equivalent ``nn.Linear`` ones; returns how many."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return 0
    n = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, Conv1D):
            k, out = m.weight.shape  # Conv1D stores (in, out)
            lin = nn.Linear(k, out, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
            lin.weight.data = m.weight.data.t().contiguous() if not m.weight.is_meta else lin.weight.data
            if m.bias is not None:
                lin.bias.data = m.bias.data
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin)
            n += 1
    return n


def _check_folder(folder: Path) -> dict:
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder (a Hugging Face model folder has config.json, "
                          "safetensors weights and a tokenizer)")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ConfigError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    return _read_json(cfg)


def _wrap(backbone: nn.Module, tokenizer, wrapper: dict, source: str) -> nn.Module:
    conv1d_to_linear(backbone)
    if wrapper["kind"] == "causal-lm":
        return CausalLM(backbone, tokenizer, model_name=wrapper.get("model_name"), source=source)
    return SentenceEncoder(backbone, tokenizer, wrapper["max_seq_length"], model_name=wrapper.get("model_name"),
                           pooling=wrapper.get("pooling", "mean"), normalize=wrapper.get("normalize", True),
                           source=source)


def _default_wrapper(folder: Path, config: dict, tokenizer) -> dict:
    kind = task_of(config)
    name = folder.name
    if kind == "causal-lm":
        return {"kind": kind, "model_name": name}
    st = _st_settings(folder)
    limit = min(int(config.get("max_position_embeddings") or DEFAULT_MAX_SEQ_LENGTH), DEFAULT_MAX_SEQ_LENGTH,
                int(getattr(tokenizer, "model_max_length", DEFAULT_MAX_SEQ_LENGTH) or DEFAULT_MAX_SEQ_LENGTH))
    if config.get("model_type") in ("roberta", "xlm-roberta"):  # positions start after the padding index
        limit = min(limit, int(config.get("max_position_embeddings", 514)) - 2)
    return {"kind": kind, "model_name": name, "pooling": st["pooling"], "normalize": st["normalize"],
            "max_seq_length": int(st["max_seq_length"] or limit)}


def _auto_class(kind: str):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if kind == "causal-lm" else AutoModel


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The fp32 task model (``CausalLM`` or ``SentenceEncoder``) of a local HF folder, in eval mode."""
    from transformers import AutoTokenizer

    folder = Path(path)
    config = _check_folder(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types here
        raise ConfigError(f"{folder}: no usable tokenizer ({type(exc).__name__}: {exc})") from None
    wrapper = _default_wrapper(folder, config, tokenizer)
    try:
        backbone = _auto_class(wrapper["kind"]).from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise ConfigError(f"{folder}: transformers could not load the model ({type(exc).__name__}: {exc})") from None
    if getattr(backbone, "pooler", None) is not None and wrapper["kind"] == "encoder":
        backbone.pooler = None  # unused by token pooling: dead parameters
    backbone.eval()
    model = _wrap(backbone, tokenizer, wrapper, str(folder))
    log.info("loaded %s (%s, %s) from %s", wrapper["model_name"], config.get("model_type"), wrapper["kind"], folder)
    return model.eval()


def build_hf(folder: Path, wrapper: dict) -> nn.Module:
    """The architecture saved in ``folder`` (config.json + tokenizer) with parameters on ``meta``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise LoadError(f"{folder}: config.json or tokenizer unreadable ({type(exc).__name__}: {exc})") from None
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers computed on the CPU
        backbone = _auto_class(wrapper["kind"]).from_config(config)
    if wrapper["kind"] == "encoder" and getattr(backbone, "pooler", None) is not None:
        backbone.pooler = None
    return _wrap(backbone, tokenizer, wrapper, str(folder))


def save_hf_files(model: nn.Module, folder: Path) -> dict | None:
    """Write the backbone's config.json and the tokenizer into ``folder``; returns the wrapper spec."""
    spec = getattr(model, "wrapper_spec", None)
    inner = getattr(model, "lm", None) or getattr(model, "bert", None)
    config = getattr(inner, "config", None)
    if spec is None or config is None:
        return None
    config.save_pretrained(str(folder))
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        tok.save_pretrained(str(folder))
    return spec()


def retie(model: nn.Module) -> None:
    """After loading into a meta-built model: give a tied input/output embedding pair the one tensor
    that was saved (``save_model`` stores tied tensors once)."""
    inner = getattr(model, "lm", None) or getattr(model, "bert", None)
    config = getattr(inner, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    try:
        emb, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return
    if not isinstance(emb, nn.Embedding) or not isinstance(head, nn.Linear):
        return  # one side was quantized: each was saved on its own
    if head.weight.is_meta and not emb.weight.is_meta:
        head.weight = emb.weight
    elif emb.weight.is_meta and not head.weight.is_meta:
        emb.weight = head.weight


def build_wrapped(folder: Path, wrapper: dict) -> nn.Module:
    """The architecture a saved folder's ``wrapper`` names, with parameters on ``meta`` where possible."""
    kind = wrapper.get("kind")
    if kind in ("encoder", "causal-lm"):
        return build_hf(folder, wrapper)
    if kind == "digits-cnn":
        from lowbit.models.digits import DigitsCNN

        return DigitsCNN()
    raise LoadError(f"{folder}: unknown model wrapper {kind!r} in metadata.json")
