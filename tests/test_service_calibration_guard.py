"""Online calibration cannot be steered by hostile traffic (issue 19, defect 6): a candidate that is
not worse on the traffic's own held-out sample but worse on clean text is rejected, because every
candidate is also validated on a fixed reference set shipped with lowbit; and operators can restrict
which clients (API key holders, IP networks) feed the buffer."""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import httpx
import pytest
import torch

from lowbit.service import online_calibration as oc
from lowbit.service.online_calibration import OnlineCalibrationConfig

from service_support import AUTH, W8_ID, copy_store, running_service

TRAFFIC = 40  # junk inputs sent: every 5th is held out -> 32 calibration + 8 held-out
ONLINE = OnlineCalibrationConfig(enabled=True, every=0, min_inputs=24, min_holdout=6, holdout_every=5, cpu_share=1.0,
                                 batch_size=16, check_interval_s=0.2, reference_size=16)


def _junk(n: int, seed: int = 0) -> list[str]:
    """Random CJK strings, the traffic the hostile test sent."""
    rng = random.Random(seed)
    return ["".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(8, 20))) for _ in range(n)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, minilm):
    root = copy_store(minilm, tmp_path_factory.mktemp("guard") / "store")
    (root / ".active.json").write_text(json.dumps({"id": W8_ID}))
    with running_service(root, online=ONLINE) as (service, url):
        service.calibrator._references["minilm"] = minilm  # the fp32 reference, already loaded
        with httpx.Client(base_url=url, timeout=300) as client:
            yield service, client


def test_candidate_worse_on_clean_text_is_rejected(server, monkeypatch):
    """The candidate equals the serving model on every token of the traffic (so the held-out check
    sees no change) and has the embeddings of the reference sentences' other tokens wiped: fitted to
    junk, worse on clean text. It must not be swapped in."""
    service, client = server
    junk = _junk(TRAFFIC)
    for i in range(0, TRAFFIC, 10):
        assert client.post("/embed", json={"inputs": junk[i:i + 10]}).status_code == 200
    tok = service.serving().model.tokenizer
    traffic_ids = {i for s in junk for i in tok(s)["input_ids"]}
    clean_ids = {i for s in service.calibrator.reference_sentences() for i in tok(s)["input_ids"]}
    steered_ids = sorted(clean_ids - traffic_ids - set(tok.all_special_ids))
    assert len(steered_ids) > 20

    def steered(model, reference, batches, run):
        new = copy.deepcopy(model)
        emb = new.bert.embeddings.word_embeddings  # a QEmbedding in W8A8-dynamic: wipe its rows' scales
        with torch.no_grad():
            (emb.scale if hasattr(emb, "qweight") else emb.weight)[steered_ids] = 0.0
        return new

    monkeypatch.setitem(oc.RECALIBRATORS, "w8a8-dynamic", steered)
    before = client.get("/models/active").json()
    r = client.post("/calibration/run", params={"wait": True}, headers=AUTH)
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["cos_mean_after"] == pytest.approx(rec["cos_mean_before"], abs=1e-6)  # traffic cannot tell
    assert rec["outcome"] == "rejected" and "worse on the fixed reference sentences" in rec["reason"], rec
    assert rec["reference_cos_mean_after"] < rec["reference_cos_mean_before"] - 0.01
    assert client.get("/models/active").json()["revision"] == before["revision"]


def test_only_configured_clients_feed_the_buffer(server):
    service, client = server
    cal = service.calibrator

    calls = iter(range(100))

    def fed(headers=None) -> int:  # fresh sentences each call: a repeated input is not buffered again
        i = next(calls)
        n = sum(client.get("/calibration").json()["buffer"].values())
        assert client.post("/embed", json={"inputs": [f"one sentence {i}", f"another one {i}"]},
                           headers=headers).status_code == 200
        assert client.post("/v1/embeddings", json={"input": f"a third {i}"}, headers=headers).status_code == 200
        return sum(client.get("/calibration").json()["buffer"].values()) - n

    base = dataclasses.replace(cal.config)
    try:
        assert fed() == 3  # default: every client
        cal.config = dataclasses.replace(base, sources=("key",))
        assert fed() == 0 and fed({"Authorization": "Bearer wrong"}) == 0
        assert fed(AUTH) == 3
        cal.config = dataclasses.replace(base, sources=("10.0.0.0/8",))
        assert fed(AUTH) == 0  # the key is not enough when only a network is allowed
        cal.config = dataclasses.replace(base, sources=("10.0.0.0/8", "127.0.0.1"))
        assert fed() == 3
        assert client.get("/calibration").json()["inputs_not_from_sources"] == 9
    finally:
        cal.config = base


def test_accepted_recalibration_is_a_new_version_and_rollback_is_one_call(server, monkeypatch):
    """An accepted candidate is saved as <id>-r1 with its lineage, recorded as active (a restart serves
    it), and POST /calibration/rollback serves the parent again."""
    from lowbit.service.state import ModelService

    from service_support import API_KEY

    service, client = server
    assert client.post(f"/models/{W8_ID}/activate", headers=AUTH).status_code == 200
    for i in range(0, TRAFFIC, 10):  # enough buffered traffic whatever the tests before left
        assert client.post("/embed", json={"inputs": _junk(10, seed=100 + i)}).status_code == 200
    monkeypatch.setitem(oc.RECALIBRATORS, "w8a8-dynamic", lambda model, ref, batches, run: copy.deepcopy(model))
    # the copy is the same model: allow float summation-order noise between two forwards
    monkeypatch.setattr(service.calibrator, "config", dataclasses.replace(service.calibrator.config, tolerance=1e-6))
    before = client.get("/models/active").json()
    rec = client.post("/calibration/run", params={"wait": True}, headers=AUTH).json()
    new_id = f"{W8_ID}-r1"
    assert rec["outcome"] == "accepted" and rec["new_model_id"] == new_id, rec
    active = client.get("/models/active").json()
    assert active["id"] == new_id and active["revision"] == before["revision"] + 1 and active["is_quantized"]
    assert client.post("/embed", json={"inputs": "x"}).json()["model"] == new_id
    lineage = client.get(f"/models/{new_id}").json()["metadata"]["calibration"]
    assert lineage["parent_id"] == W8_ID and len(lineage["sha256"]) == 64
    assert lineage["n_samples"] == rec["n_calibration"]
    assert lineage["before"]["reference_cos_mean_before"] == rec["reference_cos_mean_before"]
    assert lineage["after"]["cos_mean_after"] == rec["cos_mean_after"]
    root = service.store.root
    assert json.loads((root / ".active.json").read_text()) == {"id": new_id}
    restarted = ModelService(root, API_KEY, register_default=False)  # what a restart serves
    try:
        assert restarted.serving().model_id == new_id and restarted.serving().is_quantized
    finally:
        restarted.shutdown()

    r = client.post("/calibration/rollback", headers=AUTH)
    assert r.status_code == 200 and r.json()["id"] == W8_ID, r.text
    assert json.loads((root / ".active.json").read_text()) == {"id": W8_ID}
    r = client.post("/calibration/rollback", headers=AUTH)
    assert r.status_code == 409 and "no parent version" in r.json()["detail"]
    assert client.post("/calibration/rollback").status_code == 401


def test_repeated_inputs_are_buffered_once(server):
    service, client = server
    n = sum(client.get("/calibration").json()["buffer"].values())
    for _ in range(5):
        assert client.post("/embed", json={"inputs": ["the same words", "the same words"]}).status_code == 200
    assert sum(client.get("/calibration").json()["buffer"].values()) - n == 1
