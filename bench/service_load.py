"""Bounded loopback load test of ``lowbit serve`` (issue 19): N clients for S seconds mixing embeddings
(/embed, /v1/embeddings) and generations (/v1/completions, /v1/chat/completions streamed), while an
admin thread runs a quantize job, an online recalibration and two hot swaps. Reports every non-2xx
response and transport error, the requests by kind, and the server process's RSS over time.

    flock /tmp/lowbit-heavy.lock nice -n 10 .venv/bin/python bench/service_load.py [--clients 16 --seconds 60]

The server is ``python -m lowbit serve`` in a subprocess on 127.0.0.1 (its RSS is read from
/proc/PID/status, so the clients' memory is not counted) over a fresh store holding the bundled
MiniLM (fp32), a W8A8-dynamic MiniLM and SmolLM2 (served as the causal LM with the int8 KV cache).
Not a test: it takes minutes and measures the machine it runs on.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

KEY = "load-test-key"
CALIB_BUFFER = 96  # recalibrate from 96 distinct inputs (the default 128 took > 40 s to arrive on 2 busy cores)
AFTER_S = 300.0  # after the load: wait at most this long for the job and the recalibration to finish


def traffic() -> list[str]:
    """The clients' sentences: lowbit's calibration half (the reference set guarding swaps is the eval half)."""
    from lowbit.data import calib_sentences, max_sentences

    return calib_sentences(max_sentences("calib"))


def build_store(root: Path) -> None:
    import lowbit
    from lowbit.algorithms._calib import default_calibration
    from lowbit.config import build_config
    from lowbit.models import load_model

    enc = load_model("minilm")
    lowbit.save(enc, root / "minilm")
    q = copy.deepcopy(enc)
    lowbit.quantize(q, build_config("w8a8-dynamic", {}), default_calibration(q, 16))
    lowbit.save(q, root / "minilm-w8")
    lowbit.save(load_model("smollm2"), root / "smollm2")


def rss_mib(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = Counter()
        self.bad: list[str] = []
        self.models = Counter()

    def add(self, kind: str, status: int | None, detail: str = "") -> None:
        with self.lock:
            if status is not None and 200 <= status < 300:
                self.ok[kind] += 1
            else:
                self.bad.append(f"{kind}: {status} {detail[:1500]}")


def embed_client(url: str, stop: threading.Event, tally: Tally, seed: int, sentences: list[str]) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=120) as c:
        while not stop.is_set():
            batch = rng.sample(sentences, rng.randint(1, 4))
            try:
                if rng.random() < 0.5:
                    r = c.post("/embed", json={"inputs": batch})
                    kind = "embed"
                    if r.status_code == 200:
                        with tally.lock:
                            tally.models[r.json()["model"]] += 1
                else:
                    r = c.post("/v1/embeddings", json={"input": batch, "model": "x"})
                    kind = "v1/embeddings"
                tally.add(kind, r.status_code, r.text)
            except httpx.HTTPError as exc:
                tally.add("embed", None, f"{type(exc).__name__}: {exc}")


def gen_client(url: str, stop: threading.Event, tally: Tally, seed: int, sentences: list[str]) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=300) as c:
        while not stop.is_set():
            try:
                if rng.random() < 0.5:
                    r = c.post("/v1/completions", json={"prompt": rng.choice(sentences), "max_tokens": 12,
                                                        "temperature": 0.7, "seed": rng.randint(0, 1000)})
                    tally.add("completions", r.status_code, r.text)
                else:
                    body = {"messages": [{"role": "user", "content": rng.choice(sentences)}], "max_tokens": 12,
                            "stream": True}
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        events = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                    done = bool(events) and events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
                    tally.add("chat-stream", r.status_code if done else -1, "" if done else str(events[-2:]))
            except httpx.HTTPError as exc:
                tally.add("generate", None, f"{type(exc).__name__}: {exc}")


def admin(url: str, seconds: float, log: list[str], t0: float, state: dict) -> None:
    """A quantize job, a swap, a recalibration, a second swap, spread over the run."""
    auth = {"Authorization": f"Bearer {KEY}"}

    def note(msg: str) -> None:
        log.append(f"t={time.monotonic() - t0:5.1f}s {msg}")

    def wait_until(t: float) -> None:
        time.sleep(max(0.0, t0 + t - time.monotonic()))

    with httpx.Client(base_url=url, timeout=600) as c:
        wait_until(0.05 * seconds)
        r = c.post("/models/minilm/quantize", headers=auth, json={"scheme": "w8a8-dynamic", "target_id": "minilm-job"})
        job = state["job"] = r.json().get("id")
        note(f"quantize job submitted: {r.status_code} {job}")
        wait_until(0.2 * seconds)
        r = c.post("/models/minilm-w8/activate", headers=auth)
        note(f"swap 1 -> minilm-w8: {r.status_code}")
        wait_until(0.3 * seconds)
        while time.monotonic() - t0 < 0.8 * seconds:  # until the buffer holds enough distinct inputs
            state["calib_at"] = time.time()
            r = c.post("/calibration/run", headers=auth)
            time.sleep(1.0)
            last = (c.get("/calibration").json()["history"] or [{}])[-1]
            if r.status_code != 202 or last.get("outcome") != "skipped" or "need" not in last.get("reason", ""):
                break
            time.sleep(2.0)
        note(f"recalibration requested: {r.status_code} ({c.get('/calibration').json()['buffer']} buffered)")
        wait_until(0.7 * seconds)
        j = c.get(f"/jobs/{job}").json() if job else {}
        while j.get("status") in ("queued", "running") and time.monotonic() - t0 < 0.9 * seconds:
            time.sleep(1.0)
            j = c.get(f"/jobs/{job}").json()
        target = "minilm-job" if j.get("status") == "succeeded" else "minilm"
        note(f"job {j.get('status')} ({j.get('stage')})")
        r = c.post(f"/models/{target}/activate", headers=auth)
        note(f"swap 2 -> {target}: {r.status_code}")


def write_report(args, load_start: float, log: list[str], recal: list[dict], tally: Tally, gen_lines: list[str],
                 rss: list[tuple[float, float]], rss_at_quarter: float) -> None:
    """bench/results/service_load.{md,json}: what the run printed, as a table and as data."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _llm_common import machine, write_results

    total = sum(tally.ok.values())
    # the admin thread's events are "t= 42.3s ..."; memory after the last one shows the steady state
    last_event = max((float(e.split("s", 1)[0].removeprefix("t=")) for e in log if e.startswith("t=")), default=0.0)
    tail = [r for t, r in rss if t >= last_event] or [rss[-1][1]]
    peak = max(r for _, r in rss)
    meta = {"machine": machine(), "clients": args.clients, "gen_clients": args.gen_clients, "seconds": args.seconds,
            "load_start": load_start, "load_end": os.getloadavg()[0], "events": log, "recalibration": recal,
            "ok_by_kind": dict(tally.ok), "embeddings_by_model": dict(tally.models), "failures": tally.bad,
            "generation_metrics": gen_lines, "rss_mib": rss}
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(tally.ok.items()))
    outcome = (recal[-1].get("outcome") if recal else None) or "none"
    md = "\n".join([
        "# lowbit serve under load: embeddings + generations through a quantize job, a recalibration and two swaps",
        "",
        f"`python bench/service_load.py --clients {args.clients} --seconds {args.seconds:.0f}` — {args.clients} clients "
        f"({args.gen_clients} generating, the rest embedding) on 127.0.0.1 for {args.seconds:.0f} s; 2 CPUs shared by "
        f"server and clients; 1-min load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| responses 2xx | {total} ({kinds}) |",
        f"| failures (non-2xx or transport errors) | {len(tally.bad)} |",
        f"| embeddings by serving model | {', '.join(f'{k} {v}' for k, v in tally.models.items())} |",
        f"| recalibration | {outcome} |",
        f"| server RSS MiB: start / at 25 % / end / max | {rss[0][1]:.0f} / {rss_at_quarter:.0f} / {rss[-1][1]:.0f} / {peak:.0f} |",
        f"| RSS growth from 25 % to the end | {rss[-1][1] - rss_at_quarter:+.0f} MiB |",
        f"| after the last admin event (t = {last_event:.0f} s): RSS min / max / end | "
        f"{min(tail):.0f} / {max(tail):.0f} / {rss[-1][1]:.0f} MiB over {rss[-1][0] - last_event:.0f} s |",
        "",
        "Events: " + "; ".join(log),
        "",
        "Server RSS over time (s: MiB): " + " ".join(f"{t:.0f}: {r:.0f}" for t, r in rss),
        "",
    ])
    write_results("service_load", [], md, meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16, help="clients in all (default 16)")
    ap.add_argument("--gen-clients", type=int, default=2, help="of which generate text (default 2 = --max-generations)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    if not 0 < args.gen_clients < args.clients or not 1 <= args.seconds <= 600:
        ap.error("need 0 < --gen-clients < --clients and 1 <= --seconds <= 600")
    from lowbit.service.server import free_port

    root = Path(tempfile.mkdtemp(prefix="lowbit-load-"))
    store = root / "store"
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    proc = None
    try:
        t = time.monotonic()
        build_store(store)
        print(f"store built in {time.monotonic() - t:.0f} s", flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "lowbit", "serve", "--store", str(store), "--port", str(port),
                                 "--api-key", KEY, "--lm", "smollm2", "--online-calibration", "--calib-every", "0",
                                 "--calib-buffer", str(CALIB_BUFFER),
                                 "--max-generations", str(args.gen_clients)],
                                env=env, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"))
        end = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"server did not start; see {root / 'server.log'}")
            time.sleep(0.5)
        active = httpx.get(url + "/models/active").json()
        print(f"serving {active['id']} and {active['lm']['id']} (kv {active['lm']['kv_cache']}); "
              f"RSS {rss_mib(proc.pid):.0f} MiB", flush=True)
        load_start = os.getloadavg()[0]
        tally, stop, log, state = Tally(), threading.Event(), [], {}
        sentences = traffic()
        t0 = time.monotonic()
        threads = [threading.Thread(target=gen_client if i < args.gen_clients else embed_client,
                                    args=(url, stop, tally, i, sentences), daemon=True) for i in range(args.clients)]
        threads.append(threading.Thread(target=admin, args=(url, args.seconds, log, t0, state), daemon=True))
        for th in threads:
            th.start()
        rss = []
        while time.monotonic() - t0 < args.seconds:
            rss.append((time.monotonic() - t0, rss_mib(proc.pid)))
            time.sleep(2.0)
        stop.set()
        for th in threads:
            th.join(timeout=300)
        rss.append((time.monotonic() - t0, rss_mib(proc.pid)))
        print(f"load ended at t={rss[-1][0]:.0f}s; waiting up to {AFTER_S:.0f} s for the job and the recalibration",
              flush=True)
        end = time.monotonic() + AFTER_S
        while time.monotonic() < end:  # no client load now: RSS keeps being sampled
            cal = httpx.get(url + "/calibration", timeout=30).json()
            job = httpx.get(url + f"/jobs/{state.get('job')}", timeout=30).json() if state.get("job") else {}
            calib_done = any(h.get("started_at", 0) >= state.get("calib_at", 0) - 1 for h in cal["history"])
            if calib_done and job.get("status") in ("succeeded", "failed", None):
                break
            rss.append((time.monotonic() - t0, rss_mib(proc.pid)))
            time.sleep(5.0)
        rss.append((time.monotonic() - t0, rss_mib(proc.pid)))
        print("job:", job.get("status"), job.get("stage"), {k: v for k, v in ((job.get("result") or {}).get("fidelity") or {}).items()
                                                      if k in ("cos_mean", "cos_min")})
        cal = httpx.get(url + "/calibration", timeout=30).json()
        metrics = httpx.get(url + "/metrics", timeout=30).text
        gen_lines = [ln for ln in metrics.splitlines() if ln.startswith(("lowbit_generations_total",
                                                                          "lowbit_generated_tokens_total"))]
        print("\n".join(log))
        print("last recalibration:", json.dumps(cal["history"][-1:])[:400])
        print("ok by kind:", dict(tally.ok), "| total", sum(tally.ok.values()))
        print("embeddings by model:", dict(tally.models))
        print(f"failures: {len(tally.bad)}", *tally.bad[:20], sep="\n  ")
        print("\n".join(gen_lines))
        print("server RSS MiB over time:", " ".join(f"{t:.0f}s:{r:.0f}" for t, r in rss))
        first = [r for t, r in rss if t >= 0.25 * args.seconds][:1] or [rss[0][1]]
        print(f"RSS start {rss[0][1]:.0f}, at 25% {first[0]:.0f}, end {rss[-1][1]:.0f}, max {max(r for _, r in rss):.0f} MiB")
        write_report(args, load_start, log, cal["history"][-1:], tally, gen_lines, rss, first[0])
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
