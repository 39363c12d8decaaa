"""Online calibration over HTTP on the real W8A8-dynamic MiniLM: buffered traffic, validated against
fp32 on held-out traffic, swapped in only if not worse, every attempt counted with its reason."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch

from lowbit.data import eval_sentences
from lowbit.service import online_calibration as oc
from lowbit.service.online_calibration import OnlineCalibrationConfig

from service_support import AUTH, FP32_ID, W8_ID, copy_store, running_service

TRAFFIC = 40  # sentences sent: every 5th is held out -> 32 calibration + 8 held-out inputs
ONLINE = OnlineCalibrationConfig(enabled=True, every=0, min_inputs=24, min_holdout=6, holdout_every=5,
                                 cpu_share=1.0, batch_size=16, check_interval_s=0.2, reference_size=16)


@pytest.fixture(scope="module")
def server(tmp_path_factory, minilm):
    root = copy_store(minilm, tmp_path_factory.mktemp("online") / "store")
    (root / ".active.json").write_text(json.dumps({"id": W8_ID}))  # start serving the quantized model
    with running_service(root, online=ONLINE) as (service, url):
        with httpx.Client(base_url=url, timeout=300) as client:
            yield service, client


def _run(client) -> dict:
    r = client.post("/calibration/run", params={"wait": True}, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def test_too_little_traffic_is_skipped_with_reason(server):
    service, client = server
    assert client.get("/models/active").json()["id"] == W8_ID
    rec = _run(client)
    assert rec["outcome"] == "skipped" and "need 24 / 6" in rec["reason"]


def test_recalibration_validates_then_swaps_only_if_not_worse(server):
    service, client = server
    sents = eval_sentences(TRAFFIC)
    for i in range(0, TRAFFIC, 10):
        assert client.post("/embed", json={"inputs": sents[i:i + 10]}).status_code == 200
    status = client.get("/calibration").json()
    assert status["buffer"] == {"calibration": 32, "holdout": 8}
    before = client.get("/models/active").json()

    rec = _run(client)
    assert rec["outcome"] in ("accepted", "rejected"), rec
    assert rec["n_calibration"] == 32 and rec["n_holdout"] == 8
    not_worse = (rec["cos_mean_after"] >= rec["cos_mean_before"]  # on held-out traffic, then on the fixed set
                 and rec.get("reference_cos_mean_after", 0.0) >= rec.get("reference_cos_mean_before", 1.0))
    assert (rec["outcome"] == "accepted") == not_worse
    assert rec["cos_mean_before"] > 0.99 and rec["cos_mean_after"] > 0.99  # both are good W8A8 models
    after = client.get("/models/active").json()
    metrics = client.get("/metrics").text
    assert f'lowbit_online_calibration_runs_total{{outcome="{rec["outcome"]}"}} 1' in metrics
    if rec["outcome"] == "accepted":
        assert after["revision"] == before["revision"] + 1 and after["recalibration"]["n_calibration"] == 32
        assert 'lowbit_model_swaps_total{kind="recalibrate"} 1' in metrics
        assert client.post("/embed", json={"inputs": "x"}).json()["revision"] == after["revision"]
    else:
        assert after["revision"] == before["revision"]


def test_worse_candidate_is_rejected_and_nothing_changes(server, monkeypatch):
    service, client = server
    real = oc.RECALIBRATORS["w8a8-dynamic"]

    def damaged(model, reference, batches, run):
        new = real(model, reference, batches, run)
        layer = new.bert.encoder.layer[0].attention.self.query
        layer.w_scale.mul_(3.0)  # a visibly worse model
        return new

    monkeypatch.setitem(oc.RECALIBRATORS, "w8a8-dynamic", damaged)
    before = client.get("/models/active").json()
    rec = _run(client)
    assert rec["outcome"] == "rejected" and rec["reason"].startswith("worse")
    assert rec["cos_mean_after"] < rec["cos_mean_before"]
    assert client.get("/models/active").json()["revision"] == before["revision"]
    assert 'lowbit_online_calibration_runs_total{outcome="rejected"}' in client.get("/metrics").text


def test_background_trigger_and_status(server):
    service, client = server
    n = len(client.get("/calibration").json()["history"])
    r = client.post("/calibration/run", headers=AUTH)
    assert r.status_code == 202
    deadline = time.monotonic() + 300
    while len(client.get("/calibration").json()["history"]) == n and time.monotonic() < deadline:
        time.sleep(0.2)
    last = client.get("/calibration").json()["history"][-1]
    assert last["trigger"] == "manual" and last["outcome"] in ("accepted", "rejected")
    assert 'lowbit_online_calibration_last_timestamp_seconds{outcome=' in client.get("/metrics").text


def test_quantize_job_calibrated_on_traffic(server):
    service, client = server
    r = client.post(f"/models/{FP32_ID}/quantize", headers=AUTH,
                    json={"scheme": "w8a8-dynamic", "calibration": "traffic", "target_id": "from-traffic"})
    assert r.status_code == 202, r.text
    job = service.jobs.wait(r.json()["id"], timeout=600)
    assert job.status == "succeeded", job.error
    assert job.result["calibration"]["n_samples"] == 32  # the buffered calibration inputs, not the held-out ones
    assert job.result["fidelity"]["cos_mean"] > 0.99


def test_fp32_model_has_nothing_to_recalibrate(server):
    service, client = server
    assert client.post(f"/models/{FP32_ID}/activate", headers=AUTH).status_code == 200
    rec = _run(client)
    assert rec["outcome"] == "skipped" and "not quantized" in rec["reason"]


def test_recalibrator_keeps_weights_and_changes_only_smoothing(server, minilm):
    """Unit check of the W8A8-dynamic recalibrator: same layers and kernel, new SmoothQuant factors."""
    service, _ = server
    model = service.store.load(W8_ID)
    batches = [eval_sentences(16)]
    name = "bert.encoder.layer.0.attention.self.query"
    kept = model.get_submodule(name).smooth_inv.clone()
    new = oc.recalibrate_w8a8_dynamic(model, minilm, batches, lambda f, *a: f(*a))
    old_l, new_l = model.get_submodule(name), new.get_submodule(name)
    assert type(old_l) is type(new_l) and old_l.kernel == new_l.kernel
    assert not torch.equal(old_l.smooth_inv, new_l.smooth_inv)
    assert torch.allclose(old_l.dequantized_weight(), new_l.dequantized_weight(), atol=0.05)  # same W (+ rounding)
    assert torch.equal(old_l.smooth_inv, kept)  # the serving model is untouched


def test_generic_requantize_recalibrator(server, minilm):
    """The generic path (used for static W8A8): a fresh quantization of fp32 with the model's own config."""
    from lowbit.nn import DynamicQLinear

    service, _ = server
    model = service.store.load(W8_ID)
    new = oc.requantize(model, minilm, [eval_sentences(16)], lambda f, *a: f(*a))
    assert new is not minilm and not any(isinstance(m, DynamicQLinear) for m in minilm.modules())
    assert isinstance(new.get_submodule("bert.encoder.layer.0.attention.self.query"), DynamicQLinear)
    s = eval_sentences(8)
    cos = torch.nn.functional.cosine_similarity(new.encode(s), minilm.encode(s), dim=1)
    assert float(cos.min()) > 0.99  # W8A8-dynamic floor on MiniLM (measured min ~0.997)
    assert "w8a8-static" in oc.RECALIBRATORS
