"""The model store: id validation, corrupted folders listed with a reason, symlinks out of the store,
crash safety (kill -9 mid-save in a subprocess), no pickle. Real models: the digits CNN (fast to save)
and MiniLM from the shared seed store."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowbit.io.metadata import METADATA_FILE, WEIGHTS_FILE
from lowbit.service.errors import InvalidModelId, ModelNotFound, ModelUnavailable
from lowbit.service.store import ModelStore, validate_id

from service_support import FP32_ID, W8_ID, copy_store, rewrite

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bad", ["", " ", "  x", "x ", "../x", "..", ".", ".hidden", "/etc/passwd", "a/b", "a\\b",
                                 "a..b", "x" * 65, "active", "caf\u00e9", "a\x00b", "-x", None, 3])
def test_invalid_ids_are_refused(bad):
    with pytest.raises(InvalidModelId, match="model id"):
        validate_id(bad)


@pytest.mark.parametrize("good", ["minilm", "m", "minilm-w8a8_dynamic.v2", "x" * 64, "0abc"])
def test_valid_ids(good):
    assert validate_id(good) == good


@pytest.fixture()
def digits_store(tmp_path, digits_cnn):
    import lowbit

    root = tmp_path / "store"
    lowbit.save(digits_cnn, root / "m")
    return root


def test_corrupted_folders_are_listed_unavailable_with_reason(tmp_path, digits_store):
    root = digits_store
    import shutil

    for name in ("bad-json", "bad-schema", "bad-sum", "no-weights"):
        shutil.copytree(root / "m", root / name)
    (root / "bad-json" / METADATA_FILE).write_text("{not json")
    meta = json.loads((root / "bad-schema" / METADATA_FILE).read_text())
    meta["is_quantized"] = "maybe"
    (root / "bad-schema" / METADATA_FILE).write_text(json.dumps(meta))
    data = bytearray((root / "bad-sum" / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (root / "bad-sum" / WEIGHTS_FILE).write_bytes(bytes(data))
    (root / "no-weights" / WEIGHTS_FILE).unlink()
    (root / "empty-dir").mkdir()

    store = ModelStore(root)
    entries = {e.id: e for e in store.entries()}
    assert entries["m"].available
    reasons = {k: e.reason for k, e in entries.items() if not e.available}
    assert set(reasons) == {"bad-json", "bad-schema", "bad-sum", "no-weights", "empty-dir"}
    assert "not valid JSON" in reasons["bad-json"]
    assert "is_quantized" in reasons["bad-schema"]
    assert "checksum mismatch" in reasons["bad-sum"]
    assert "missing" in reasons["no-weights"] and "missing" in reasons["empty-dir"]
    with pytest.raises(ModelUnavailable, match="checksum"):
        store.load("bad-sum")
    with pytest.raises(ModelNotFound, match="no model 'nope'"):
        store.load("nope")
    # repaired on disk -> available again (checks are cached per file identity, not forever)
    shutil.rmtree(root / "bad-sum")
    shutil.copytree(root / "m", root / "bad-sum")
    assert store.entry("bad-sum").available


def test_symlinks_out_of_the_store_are_refused(tmp_path, digits_store):
    outside = tmp_path / "outside"
    import shutil

    shutil.copytree(digits_store / "m", outside / "m")
    os.symlink(outside / "m", digits_store / "escape")
    os.symlink(digits_store / "m", digits_store / "alias")  # a link inside the store is fine
    inner = digits_store / "inner"
    inner.mkdir()
    (inner / METADATA_FILE).write_bytes((digits_store / "m" / METADATA_FILE).read_bytes())
    os.symlink(outside / "m" / WEIGHTS_FILE, inner / WEIGHTS_FILE)

    store = ModelStore(digits_store)
    with pytest.raises(InvalidModelId, match="symlink out of the store"):
        store.load("escape")
    entries = {e.id: e for e in store.entries()}
    assert "symlink out of the store" in entries["escape"].reason
    assert "symlink out of its model folder" in entries["inner"].reason
    assert entries["alias"].available


def test_no_pickle_is_ever_loaded(tmp_path, digits_store, monkeypatch):
    """A pickle planted as the weights file is refused; torch.load / pickle are never called."""
    import shutil

    shutil.copytree(digits_store / "m", digits_store / "pickled")
    (digits_store / "pickled" / WEIGHTS_FILE).write_bytes(pickle.dumps({"w": torch.ones(2)}))

    def forbidden(*a, **k):
        raise AssertionError("pickle/torch.load called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    store = ModelStore(digits_store, verify=False)  # even without checksums, safetensors refuses a pickle
    assert store.load("m") is not None
    with pytest.raises(ModelUnavailable, match="unreadable safetensors"):
        store.load("pickled")
    assert "unreadable safetensors" in store.entry("pickled").reason  # remembered as unavailable


_KILL_SCRIPT = r"""
import os, sys, time
from pathlib import Path
root, point, model_id = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
import torch
import lowbit.io.atomic as atomic
import lowbit.io.checkpoint as ckpt
from lowbit.service.store import ModelStore

def pause():
    (root.parent / "ready").write_text("1")
    time.sleep(120)

if point == "weights":  # killed while the new weights are half-way into the temp folder
    real = ckpt.save_model
    def save_model(model, path, *a, **k):
        real(model, path, *a, **k)
        pause()
    ckpt.save_model = save_model
else:  # killed between moving the old version aside and renaming the new one into place
    real_replace = atomic.os.replace
    class _os:
        def __getattr__(self, k):
            return getattr(os, k)
        def replace(self, src, dst):
            real_replace(src, dst)
            if Path(dst).name.startswith(atomic.OLD_PREFIX):
                pause()
    atomic.os = _os()
store = ModelStore(root)
model = store.load("m")
with torch.no_grad():
    model.fc.bias += 1.0  # the new version differs
store.save(model, model_id, overwrite=True)
"""


KILL_POINTS = [("weights", "m"), ("rename", "m"), ("weights", "new")]


def test_kill_9_mid_save_keeps_previous_version(tmp_path, digits_cnn):
    """Three writers (one per kill point, run in parallel to save time) are killed -9 mid-save; each
    store then opens with the previous version intact and no half-written model listed."""
    import lowbit

    env = dict(os.environ, PYTHONPATH=str(REPO))
    runs = []
    for i, (point, model_id) in enumerate(KILL_POINTS):
        root = tmp_path / f"case{i}" / "store"
        lowbit.save(digits_cnn, root / "m")
        proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(root), point, model_id], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        runs.append((root, proc))
    deadline = time.monotonic() + 180
    for root, proc in runs:
        while not (root.parent / "ready").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the saving subprocess never reached the kill point"
            time.sleep(0.05)
        assert [p for p in root.iterdir() if p.name.startswith(".lowbit-")], "the kill point is not mid-save"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()

    for (point, model_id), (root, _) in zip(KILL_POINTS, runs):
        store = ModelStore(root)  # sweeps what the killed writer left
        assert store.swept, point
        assert not [p for p in root.iterdir() if p.name.startswith(".lowbit-")]
        assert store.ids() == ["m"]  # a never-finished new id does not appear
        loaded = store.load("m")
        assert torch.equal(loaded.fc.bias, digits_cnn.fc.bias), (point, model_id)  # previous version intact


def test_empty_store_registers_bundled_minilm_unquantized(tmp_path, minilm, monkeypatch):
    """First start on an empty store saves the bundled MiniLM as 'minilm' with is_quantized false."""
    import lowbit.models

    monkeypatch.setattr(lowbit.models, "load_model", lambda name: minilm)  # the shared fixture: no second load
    store = ModelStore(tmp_path / "fresh")
    assert store.ensure_default() == "minilm"
    meta = store.entry("minilm").metadata
    assert store.entry("minilm").available and meta.is_quantized is False and meta.model == "minilm"
    assert meta.files[WEIGHTS_FILE] and "MiniLM" in meta.source
    assert store.ensure_default() is None  # not empty any more: nothing added


def test_token_limit_boundary(minilm):
    """With truncate=False an input of exactly max_seq_length tokens passes, one more token is refused."""
    from lowbit.service.embed import embed
    from lowbit.service.errors import InputTooLarge

    limit = minilm.max_seq_length
    at_limit = " ".join(["a"] * (limit - 2))  # + [CLS] and [SEP]
    emb, n_tokens = embed(minilm, [at_limit], truncate=False)
    assert n_tokens == limit and emb.shape == (1, 384)
    with pytest.raises(InputTooLarge, match=f"limit is {limit} tokens"):
        embed(minilm, [at_limit + " a"], truncate=False)
    _, n_tokens = embed(minilm, [at_limit + " a"], truncate=True)  # default: cut like sentence-transformers
    assert n_tokens == limit


def test_seed_store_copies_are_independent(tmp_path, minilm):
    """The hard-linked store copies used by the HTTP tests: rewriting a file in one leaves the seed intact."""
    a = copy_store(minilm, tmp_path / "a", ids=(FP32_ID, W8_ID))
    rewrite(a / W8_ID / METADATA_FILE, b"{}")
    store = ModelStore(a)
    assert not store.entry(W8_ID).available and store.entry(FP32_ID).available
    from service_support import seed_store

    assert ModelStore(seed_store(minilm)).entry(W8_ID).available


def test_dynamic_batching_groups_waiting_requests(minilm):
    """Requests queued while the compute thread is busy run as one pass; each gets its own rows, equal to
    embedding it alone; a truncate=False request runs alone; an error reaches only its own request."""
    from lowbit.service.active import Serving
    from lowbit.service.batching import Batcher
    from lowbit.service.embed import embed
    from lowbit.service.errors import InputTooLarge

    tasks = []
    snapshot = Serving("m", minilm, None, 1, 0.0)
    b = Batcher(lambda fn: tasks.append(fn), lambda: snapshot, max_inputs=4)
    reqs = [["A short one."], ["Two sentences here.", "And a somewhat longer second sentence."], ["Third."],
            ["Too many for the group: it waits for the next pass."] * 2]
    futs = [b.embed(r) for r in reqs]
    long = " ".join(["a"] * 300)
    strict = b.embed([long], truncate=False)
    assert len(tasks) == 1  # one drain scheduled while "busy"
    while tasks:
        tasks.pop(0)()
    assert b.passes == 3 and b.batched_requests == 3  # [r0 r1 r2], [r3], [strict]
    for r, f in zip(reqs, futs):
        serving, emb, counts = f.result()
        alone, n = embed(minilm, r)
        assert serving is snapshot and torch.allclose(emb, alone, atol=1e-5) and sum(counts) == n
    with pytest.raises(InputTooLarge, match="tokens"):
        strict.result()
