"""Save and load quantized models: safetensors weights + ``metadata.json``, written atomically.

``save(model, folder)`` records every quantized layer's spec and, for Hugging Face based models,
the architecture's ``config.json`` and the tokenizer beside the weights, so the folder is
self-contained. ``load(folder)`` builds that architecture with its parameters on the ``meta``
device (no fp32 model is ever materialised), swaps in quantized modules from their specs after
checking them against the safetensors header, verifies the weights' sha256 and assigns the tensors
read from the file. A user's own ``nn.Module`` is loaded with ``load(folder, model=MyNet())``.
Folders saved before the wrapper was recorded are rebuilt from the bundled model they name. No
pickle anywhere, and no code is ever read from a folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
import torch
from safetensors.torch import load_file, save_model
from torch import nn

from lowbit import __version__
from lowbit.analysis.footprint import model_size_bytes
from lowbit.api import set_submodule
from lowbit.config import config_from_json, config_to_json
from lowbit.errors import ConfigError, LoadError, LowbitError
from lowbit.io.atomic import atomic_dir, atomic_write_text, sha256_file  # noqa: F401  (sha256_file re-exported)
from lowbit.io.metadata import METADATA_FILE, WEIGHTS_FILE, ModelMetadata, read_metadata
from lowbit.models.hf import save_hf_files

log = logging.getLogger(__name__)


def _config_summary(cfg: Any) -> tuple[float | None, str | None]:
    bits = getattr(cfg, "bits", None)
    if bits is None and cfg is not None:
        bits = 8 if "8" in getattr(cfg, "scheme", "") else None
    gs = getattr(cfg, "group_size", None)
    gran = None if gs is None else (f"per_group({gs})" if gs else "per_channel")
    if gran is None and cfg is not None and getattr(cfg, "kind", "") == "w8a8-dynamic":
        gran = "weights per_channel, activations per_token"
    return bits, gran


def build_metadata(model: nn.Module, model_id: str, fidelity: dict | None = None,
                   calibration: dict | None = None) -> ModelMetadata:
    cfg = getattr(model, "lowbit_config", None)
    report = getattr(model, "lowbit_report", None)
    bits, gran = _config_summary(cfg)
    size = model_size_bytes(model)
    fp32_numel = getattr(model, "lowbit_fp32_numel", None) or sum(p.numel() for p in model.parameters())
    wrapper = getattr(model, "wrapper_spec", None)
    return ModelMetadata(
        id=model_id,
        wrapper=wrapper() if callable(wrapper) else None,
        model=getattr(model, "model_name", type(model).__name__),
        source=getattr(model, "source", ""),
        architecture=getattr(model, "architecture", type(model).__name__),
        task=getattr(model, "task", ""),
        is_quantized=report is not None,
        scheme=getattr(model, "lowbit_scheme", None),
        config=config_to_json(cfg) if cfg is not None else None,
        bits=bits,
        granularity=gran,
        layers=report.layers if report else {},
        skipped=report.skipped if report else {},
        calibration=calibration or getattr(model, "lowbit_calibration", None),
        sizes={"size_bytes": size, "fp32_bytes": 4 * fp32_numel, "bits_per_weight": 8 * size / fp32_numel},
        fidelity=fidelity or {},
        library_version=__version__,
    )


def save(model: nn.Module, folder: str | Path, *, fidelity: dict | None = None, calibration: dict | None = None,
         overwrite: bool = False, model_id: str | None = None) -> ModelMetadata:
    """Write ``folder/model.safetensors`` and ``folder/metadata.json`` atomically; returns the metadata."""
    folder = Path(folder)
    meta = build_metadata(model, model_id or folder.name, fidelity, calibration)
    try:
        with atomic_dir(folder, overwrite=overwrite) as tmp:
            save_model(model, str(tmp / WEIGHTS_FILE))  # de-duplicates tied tensors
            meta.aliases = _aliases(model, tmp / WEIGHTS_FILE)
            save_hf_files(model, tmp)  # config.json + tokenizer: the folder rebuilds without the source
            meta.files = {WEIGHTS_FILE: sha256_file(tmp / WEIGHTS_FILE)}
            atomic_write_text(tmp / METADATA_FILE, meta.model_dump_json(indent=2))
    except FileExistsError as exc:
        raise ConfigError(str(exc)) from None
    log.info("saved %s (%s, %.1f MB)", folder, meta.scheme or "fp32", meta.sizes["size_bytes"] / 1e6)
    return meta


def load(folder: str | Path, verify: bool = True, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved model from its folder alone. Every failure is a :class:`LoadError` naming the file.

    ``model``: an instance of the user's own architecture (for models lowbit cannot build itself);
    its float layers are replaced from the recorded specs and all tensors loaded from the folder."""
    from lowbit.io.header_check import check_weights_header
    from lowbit.models import load_model
    from lowbit.models.hf import build_wrapped, retie
    from lowbit.nn import module_from_spec

    folder = Path(folder)
    if not folder.is_dir():
        raise LoadError(f"{folder}: not a folder")
    meta = read_metadata(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise LoadError(f"{weights}: missing")
    if verify:
        want = meta.files.get(WEIGHTS_FILE)
        if want and sha256_file(weights) != want:
            raise LoadError(f"{weights}: checksum mismatch (file truncated or edited after saving)")
    check_weights_header(folder, meta)  # specs vs the file's header, before anything is allocated
    try:
        if model is not None:
            base = model
        elif meta.wrapper is not None:
            base = build_wrapped(folder, meta.wrapper)
        else:  # folders saved before the wrapper was recorded: the bundled model they name
            base = load_model(meta.model)
    except LowbitError as exc:
        raise LoadError(f"{folder / METADATA_FILE}: {exc}") from None
    if (meta.config or {}).get("rotate") and not any(  # rotated with its head untied (lowbit.algorithms.rotation)
            spec.get("class") == "RotatedRMSNorm" for spec in meta.layers.values()):
        from lowbit.algorithms.rotation import untie_head

        untie_head(base)
    for name, spec in meta.layers.items():
        try:
            base.get_submodule(name)  # the layer must exist in the base architecture
            with torch.device("meta"):  # storage comes from the file (assigned), not allocated twice
                set_submodule(base, name, module_from_spec(spec))
        except AttributeError:
            raise LoadError(f"{folder / METADATA_FILE}: layer {name!r} does not exist in {meta.model}") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(f"{weights}: unreadable safetensors ({exc})") from None
    _load_state(base, state, weights)
    _tie_aliases(base, meta.aliases, weights)
    _share_tables(base)
    retie(base)
    empty = [n for n, t in list(base.named_parameters()) + list(base.named_buffers()) if t.is_meta]
    if empty:
        raise LoadError(f"{weights}: missing tensors {empty[:5]} (file truncated or from another model)")
    model = base
    if meta.is_quantized:
        from lowbit.api import QuantizeReport

        model.lowbit_config = config_from_json(meta.config) if meta.config else None
        model.lowbit_scheme = meta.scheme
        model.lowbit_report = QuantizeReport(layers=dict(meta.layers), skipped=dict(meta.skipped))
    model.lowbit_fp32_numel = int(meta.sizes.get("fp32_bytes", 0) // 4) or None
    model.lowbit_metadata = meta
    model.eval()
    return model


def _aliases(model: nn.Module, weights: Path) -> dict[str, str]:
    """Tensors ``save_model`` stored once for several names: each dropped name -> the stored one."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        stored = set(f.keys())
    own = model.state_dict(keep_vars=True)
    by_storage: dict[tuple, str] = {}
    for k in stored:
        t = own[k]
        by_storage[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = k
    out = {}
    for k, t in own.items():
        if k not in stored:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key in by_storage:
                out[k] = by_storage[key]
    return out


def _tie_aliases(model: nn.Module, aliases: dict[str, str], weights: Path) -> None:
    """Give each alias the very tensor stored under its target name (tied weights stay tied)."""
    for alias, target in aliases.items():
        owner_name, _, leaf = alias.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
            tensor = model.get_parameter(target) if leaf in owner._parameters else model.get_buffer(target)
        except AttributeError:
            raise LoadError(f"{weights}: tied tensor {alias!r} -> {target!r} names no tensor of the model") from None
        if leaf in owner._parameters:
            owner._parameters[leaf] = tensor
        else:
            owner._buffers[leaf] = tensor


def _share_tables(model: nn.Module) -> None:
    """A ``QTableEmbedding`` whose table's tensors all alias another module's (a tied head) takes that
    module itself, so the model is again one module in two places, as it was when saved."""
    from lowbit.nn.gguf_linear import QTableEmbedding

    modules = list(model.modules())
    for emb in modules:
        if not isinstance(emb, QTableEmbedding):
            continue
        mine = [t for t in emb.table._buffers.values() if t is not None]
        for other in modules:
            if other is emb.table or type(other) is not type(emb.table):
                continue
            theirs = [t for t in other._buffers.values() if t is not None]
            if mine and len(mine) == len(theirs) and all(a is b for a, b in zip(mine, theirs)):
                emb.table = other
                break


def _load_state(model: nn.Module, state: dict, weights: Path) -> None:
    """Strict load that tolerates only tied duplicates (saved once by ``save_model``).

    Tensors still on ``meta`` (a model built without memory) take the file's tensors as they are
    (``assign``); materialised ones are copied into, which keeps tied parameters shared."""
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise LoadError(f"{weights}: unexpected tensors {unexpected[:5]} (saved from a different architecture?)")
    for k, t in state.items():
        if own[k].shape != t.shape or own[k].dtype != t.dtype:
            raise LoadError(f"{weights}: tensor {k} is {tuple(t.shape)} {t.dtype}, "
                            f"expected {tuple(own[k].shape)} {own[k].dtype}")
    # Tied parameters (e.g. a shared embedding / LM head) are stored once; they share storage here too.
    ptrs: dict[int, list[str]] = {}
    for k, t in own.items():
        if not t.is_meta:
            ptrs.setdefault(t.untyped_storage().data_ptr(), []).append(k)
    really_missing = [k for k in own if k not in state and not own[k].is_meta
                      and not any(o in state for o in ptrs[own[k].untyped_storage().data_ptr()])]
    if really_missing:
        raise LoadError(f"{weights}: missing tensors {really_missing[:5]} (file truncated or from another model)")
    on_meta = {k for k, t in own.items() if t.is_meta}
    model.load_state_dict({k: v for k, v in state.items() if k not in on_meta}, strict=False)
    if on_meta:
        model.load_state_dict({k: v for k, v in state.items() if k in on_meta}, strict=False, assign=True)
