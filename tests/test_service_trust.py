"""What a hostile test found (issue 19), on the real MiniLM models: activation that swapped although
its record failed, a quantize job overwriting the served model, folders trusted too much
(``is_quantized`` never checked, specs allocated before the header was read, broken weights listed as
available), and server paths in unauthenticated responses."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import threading

import httpx
import pytest

from lowbit.io.checkpoint import sha256_file
from lowbit.io.metadata import METADATA_FILE, WEIGHTS_FILE
from lowbit.service.errors import ModelUnavailable
from lowbit.service.store import ModelStore

from service_support import AUTH, FP32_ID, W8_ID, copy_store, rewrite, running_service

LAYER = "bert.encoder.layer.0.output.dense"  # a DynamicQLinear of the W8A8-dynamic seed model
JOB_WAIT_S = 120


def _edit_metadata(folder, **changes) -> None:
    meta = json.loads((folder / METADATA_FILE).read_text())
    for k, v in changes.items():
        if callable(v):
            v(meta)
        else:
            meta[k] = v
    rewrite(folder / METADATA_FILE, json.dumps(meta).encode())


def _clone(root, src: str, dst: str):
    import os

    shutil.copytree(root / src, root / dst, copy_function=os.link)
    return root / dst


def _huge_spec(meta):
    meta["layers"][LAYER].update(in_features=50_000, out_features=50_000)


@pytest.fixture(scope="module")
def store_root(tmp_path_factory, minilm):
    """The seed store plus folders that lie: a float model claiming to be quantized, a quantized one
    claiming not to be, a 50000x50000 spec, weights whose header disagrees with the specs (with a
    matching sha256), unreadable metadata."""
    from safetensors.torch import load_file, save_file

    root = copy_store(minilm, tmp_path_factory.mktemp("trust") / "store")
    _edit_metadata(_clone(root, FP32_ID, "fake-quantized"), is_quantized=True, scheme="w8a8-dynamic")
    _edit_metadata(_clone(root, W8_ID, "fake-float"), is_quantized=False)
    _edit_metadata(_clone(root, W8_ID, "huge-spec"), layers=_huge_spec)  # a callable edits in place
    bad = _clone(root, W8_ID, "bad-header")
    state = load_file(str(root / W8_ID / WEIGHTS_FILE))
    state[f"{LAYER}.w_scale"] = state[f"{LAYER}.w_scale"][:-1].clone()  # one channel short
    (bad / WEIGHTS_FILE).unlink()
    save_file(state, str(bad / WEIGHTS_FILE))
    _edit_metadata(bad, files={WEIGHTS_FILE: sha256_file(bad / WEIGHTS_FILE)})  # the checksum agrees
    _edit_metadata(_clone(root, W8_ID, "broken-meta"), format_version="x")
    return root


# ---- 5 and 7: folders are checked against what they hold, before anything is allocated ------------

def test_is_quantized_must_agree_with_the_layers(store_root, monkeypatch):
    store = ModelStore(store_root)
    for model_id, words in (("fake-quantized", "is_quantized: true but records no quantized layer"),
                            ("fake-float", "is_quantized: false but records")):
        entry = store.entry(model_id)
        assert not entry.available and words in entry.reason, (model_id, entry.reason)
        with pytest.raises(ModelUnavailable, match="is_quantized"):
            store.load(model_id)
    # the loaded modules are checked too, not only what metadata.json says about itself
    import lowbit.service.store as store_mod

    monkeypatch.setattr(store_mod, "quantization_contradiction", lambda meta: None)
    store = ModelStore(store_root)
    assert store.entry("fake-quantized").available
    with pytest.raises(ModelUnavailable, match="is_quantized: true but the modules loaded are not quantized"):
        store.load("fake-quantized")
    assert "modules loaded are not quantized" in store.entry("fake-quantized").reason  # remembered


def test_specs_are_checked_against_the_header_before_allocating(store_root, monkeypatch):
    import lowbit.service.store as store_mod

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded (tensors allocated) before the header check")

    monkeypatch.setattr(store_mod, "load_folder", no_load)
    store = ModelStore(store_root)
    entry = store.entry("huge-spec")
    assert not entry.available
    assert f"tensor '{LAYER}.qweight_t' is I8 [1536, 384]" in entry.reason and "[50000, 50000]" in entry.reason
    assert entry.reason.startswith(f"huge-spec/{WEIGHTS_FILE}")  # names the file, relative to the store
    with pytest.raises(ModelUnavailable, match="50000"):
        store.load("huge-spec")


def test_broken_weights_are_listed_unavailable_even_with_a_matching_checksum(store_root):
    entries = {e.id: e for e in ModelStore(store_root).entries()}
    assert entries[W8_ID].available and entries[FP32_ID].available
    bad = entries["bad-header"]
    assert not bad.available and f"tensor '{LAYER}.w_scale' is F32 [383]" in bad.reason, bad.reason
    assert "needs F32 [384]" in bad.reason


def test_header_check_refuses_files_that_are_not_safetensors(tmp_path, store_root):
    from lowbit.errors import LoadError
    from lowbit.io.header_check import check_weights_header
    from lowbit.io.metadata import read_metadata

    meta = read_metadata(store_root / W8_ID)
    check_weights_header(store_root / W8_ID, meta)  # the real folder passes
    data = (store_root / W8_ID / WEIGHTS_FILE).read_bytes()
    n = int.from_bytes(data[:8], "little")
    cases = {"short": data[:5], "huge-length": (10**12).to_bytes(8, "little") + data[8:],
             "not-json": data[:8] + b"\xff" * n + data[8 + n:], "truncated-data": data[:-100],
             "missing": b""}
    for name, blob in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        if name != "missing":
            (folder / WEIGHTS_FILE).write_bytes(blob)
        with pytest.raises(LoadError, match=WEIGHTS_FILE):
            check_weights_header(folder, meta)


# ---- 3, 4 and 8 over HTTP ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(store_root):
    with running_service(store_root) as (service, url):
        with httpx.Client(base_url=url, timeout=JOB_WAIT_S) as client:
            assert client.post(f"/models/{FP32_ID}/activate", headers=AUTH).status_code == 200
            yield service, client


def test_activate_that_cannot_record_itself_changes_nothing(server, monkeypatch):
    import lowbit.service.state as state

    service, client = server
    before = client.get("/models/active").json()
    assert before["id"] == FP32_ID
    record = (service.store.root / ".active.json").read_text()

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(state, "atomic_write_text", disk_full)
    r = client.post(f"/models/{W8_ID}/activate", headers=AUTH)
    assert r.status_code == 503 and "nothing changed" in r.json()["detail"], r.text
    assert str(service.store.root) not in r.text
    after = client.get("/models/active").json()
    assert after["id"] == FP32_ID and after["revision"] == before["revision"]  # still the old model
    assert client.post("/embed", json={"inputs": "x"}).json()["model"] == FP32_ID
    assert (service.store.root / ".active.json").read_text() == record  # a restart serves the same model
    monkeypatch.undo()
    r = client.post(f"/models/{W8_ID}/activate", headers=AUTH)
    assert r.status_code == 200 and json.loads((service.store.root / ".active.json").read_text()) == {"id": W8_ID}
    assert client.post(f"/models/{FP32_ID}/activate", headers=AUTH).status_code == 200


def test_a_model_being_written_by_a_job_cannot_be_activated(server, monkeypatch):
    """A quantize job overwrites minilm-w8 (not active at submission); activating minilm-w8 while the
    job is queued or running is refused, so the job never replaces the served model's files."""
    import lowbit.service.state as state

    service, client = server
    release = threading.Event()
    checked: list = []

    def slow_task(store, source_id, target_id, config, *, before_save, **kw):
        assert release.wait(JOB_WAIT_S)
        try:
            before_save()
        except Exception as exc:  # reported as the job's error
            checked.append(str(exc))
            raise
        return {"model_id": target_id}

    monkeypatch.setattr(state, "quantize_task", slow_task)
    r = client.post(f"/models/{FP32_ID}/quantize", headers=AUTH,
                    json={"scheme": "w8a8-dynamic", "target_id": W8_ID, "overwrite": True})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    try:
        r = client.post(f"/models/{W8_ID}/activate", headers=AUTH)
        assert r.status_code == 409 and f"being written by quantize job {job_id}" in r.json()["detail"], r.text
        assert client.get("/models/active").json()["id"] == FP32_ID
    finally:
        release.set()
    job = service.jobs.wait(job_id, JOB_WAIT_S)
    assert job.status == "succeeded", job.error
    assert client.post(f"/models/{W8_ID}/activate", headers=AUTH).status_code == 200  # after the job: fine

    # and if the target became active anyway, the job refuses to write it
    assert client.post(f"/models/{FP32_ID}/activate", headers=AUTH).status_code == 200
    release.clear()
    r = client.post(f"/models/{FP32_ID}/quantize", headers=AUTH,
                    json={"scheme": "w8a8-dynamic", "target_id": W8_ID, "overwrite": True})
    assert r.status_code == 202
    service.active.activate(W8_ID, service.store.load, lambda m: None)  # bypasses the service's check
    release.set()
    job = service.jobs.wait(r.json()["id"], JOB_WAIT_S)
    assert job.status == "failed" and f"model '{W8_ID}' is active" in job.error
    assert checked and client.post(f"/models/{FP32_ID}/activate", headers=AUTH).status_code == 200


def test_no_server_path_reaches_a_client(server, monkeypatch, caplog):
    service, client = server
    root = str(service.store.root)
    caplog.set_level(logging.WARNING, logger="lowbit")
    shutil.rmtree(service.store.root / "late-broken", ignore_errors=True)
    _edit_metadata(_clone(service.store.root, W8_ID, "late-broken"), format_version="x")
    listing = client.get("/models")
    models = {m["id"]: m for m in listing.json()["models"]}
    assert root not in listing.text and "/tmp" not in listing.text
    assert models["late-broken"]["reason"].startswith(f"late-broken/{METADATA_FILE}: invalid metadata at format_version")
    assert models["huge-spec"]["reason"].startswith(f"huge-spec/{WEIGHTS_FILE}: tensor")
    assert any(root in rec.getMessage() for rec in caplog.records)  # the full path is in the log
    r = client.post("/models/late-broken/activate", headers=AUTH)
    assert r.status_code == 409 and root not in r.text and "late-broken/metadata.json" in r.text
    assert root not in client.get("/models/huge-spec").text

    def boom():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", f"{root}/secret/inner.bin")

    monkeypatch.setattr(service.calibrator, "status", boom)
    r = client.get("/calibration")
    assert r.status_code == 503 and "secret/inner.bin" in r.text and root not in r.text, r.text
