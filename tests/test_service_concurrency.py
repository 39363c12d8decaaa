"""Clients embed continuously while a model is quantized in the background and models are activated
back and forth: zero failed requests, and every response is the embedding of the model it names."""

from __future__ import annotations

import threading
import time

import httpx
import torch

import lowbit
from service_support import AUTH, FP32_ID, copy_store, running_service

SENTENCE = "Hot swapping a model must never drop or corrupt a request."
CLIENTS = 3
SAME_MODEL_TOL = 1e-4  # max |diff| for the same model and input (float summation order only)
OTHER_MODEL_GAP = 1e-3  # fp32 vs W8A8 differ by more than this on this sentence (checked below)


def _client_loop(url: str, stop: threading.Event, log: list, errors: list, openai: bool) -> None:
    with httpx.Client(base_url=url, timeout=120) as c:
        while not stop.is_set():
            try:
                if openai:
                    r = c.post("/v1/embeddings", json={"input": [SENTENCE]})
                    ok = r.status_code == 200
                    body = r.json() if ok else None
                    rec = (body["model"], None, body["data"][0]["embedding"]) if ok else None
                else:
                    r = c.post("/embed", json={"inputs": SENTENCE})
                    ok = r.status_code == 200
                    body = r.json() if ok else None
                    rec = (body["model"], body["revision"], body["embeddings"][0]) if ok else None
                (log.append(rec) if ok else errors.append((r.status_code, r.text)))
            except Exception as exc:  # a dropped connection counts as a failed request
                errors.append((type(exc).__name__, str(exc)))


def test_embedding_while_quantizing_and_swapping(tmp_path, minilm):
    root = copy_store(minilm, tmp_path / "store", ids=(FP32_ID,))
    expected = {FP32_ID: minilm.encode([SENTENCE])[0]}
    with running_service(root) as (service, url):
        stop = threading.Event()
        logs = [[] for _ in range(CLIENTS)]
        errors: list = []
        threads = [threading.Thread(target=_client_loop, args=(url, stop, logs[i], errors, i == CLIENTS - 1))
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            with httpx.Client(base_url=url, timeout=120) as admin:
                # a real background quantization job while clients hammer the service
                r = admin.post(f"/models/{FP32_ID}/quantize", headers=AUTH,
                               json={"scheme": "w8a8-dynamic", "options": {"alpha": "none"}, "target_id": "q"})
                assert r.status_code == 202, r.text
                job = r.json()
                seen_stages = set()
                while job["status"] in ("queued", "running"):
                    time.sleep(0.2)
                    job = admin.get(f"/jobs/{job['id']}").json()
                    seen_stages.add(job["stage"])
                assert job["status"] == "succeeded", job
                assert job["result"]["is_quantized"] and job["result"]["fidelity"]["cos_mean"] > 0.99
                for model_id in ("q", FP32_ID, "q"):
                    r = admin.post(f"/models/{model_id}/activate", headers=AUTH)
                    assert r.status_code == 200, r.text
                    start, deadline = sum(map(len, logs)), time.monotonic() + 60
                    while sum(map(len, logs)) < start + 2 * CLIENTS and time.monotonic() < deadline:
                        time.sleep(0.05)  # let every client get answers from this model
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
        final_revision = service.active.current().revision

    expected["q"] = lowbit.load(root / "q").encode([SENTENCE])[0]
    assert (expected["q"] - expected[FP32_ID]).abs().max() > OTHER_MODEL_GAP  # the check below can tell them apart
    assert errors == []
    records = [rec for log in logs for rec in log]
    assert len(records) >= 2 * CLIENTS
    seen_models = set()
    for model_id, revision, emb in records:
        diff = (torch.tensor(emb) - expected[model_id]).abs().max()
        assert diff < SAME_MODEL_TOL, (model_id, revision, float(diff))
        seen_models.add(model_id)
    assert seen_models == {FP32_ID, "q"}
    for log in logs[:-1]:  # each client is sequential: the revisions it sees never go back
        revs = [rev for _, rev, _ in log]
        assert revs == sorted(revs) and revs[-1] <= final_revision
    assert {"quantizing", "saving"} & seen_stages or job["progress"] == 1.0
