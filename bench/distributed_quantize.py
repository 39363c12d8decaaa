"""SmolLM2-135M GPTQ W4 g128 at 1 and 2 gloo ranks on this machine: peak memory, CPU seconds and bytes
written per rank, and whether the quantized tensors are identical.

    .venv/bin/python bench/distributed_quantize.py            # --worlds 1 2, 16 calibration windows
    .venv/bin/python bench/distributed_quantize.py --worlds 2 # adds to the saved rows (same --calib)
    .venv/bin/python bench/distributed_quantize.py --method awq          # or smoothquant: *_awq.md / .json

Each world size is one ``torch.multiprocessing`` spawn of ``W`` ranks running
``lowbit.quantize(model, GPTQConfig(bits=4, group_size=128))`` with a gloo process group initialized
(the path ``torchrun -m lowbit quantize --scheme gptq`` takes: ``lowbit/algorithms/gptq_ranks.py``),
torch threads 1 per rank. Per rank:

- peak RSS (``ru_maxrss``) and its growth over the RSS after the fp32 model and calibration ids are
  loaded (the quantization's own working memory, including the per-window Hessian sums the
  fixed-order reduction keeps);
- CPU seconds of the quantization (user + system, ``getrusage``) and its wall seconds: the machine has
  2 cores shared with other jobs, so 2 ranks use every core and the wall time includes whatever else
  ran (the 1-minute load average before and after is recorded); CPU seconds are the comparable number;
- bytes written (``wchar`` of ``/proc/self/io``) during the quantization: gloo's socket traffic
  (nothing else writes), against the formula ``L x (windows / W) x 4 (3 h^2 + I^2) x (W - 1)`` for the
  Hessian broadcasts plus the codes / scales of the rank's solves.

Writes bench/results/distributed_quantize.md and .json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


METHODS = ("gptq", "awq", "smoothquant")
DEFAULT_CALIB = {"gptq": 16, "awq": 4, "smoothquant": 8}  # each method's default windows (AWQ: its search set)


def _config(method: str, calib: int):
    from lowbit.algorithms.awq import AWQConfig
    from lowbit.algorithms.gptq import GPTQConfig
    from lowbit.algorithms.smoothquant import SCHEME_ALPHA, WAConfig

    if method == "gptq":
        return GPTQConfig(bits=4, group_size=128, n_calib=calib)
    if method == "awq":
        return AWQConfig(bits=4, group_size=128, n_calib=calib)
    return WAConfig(alpha=SCHEME_ALPHA, n_calib=calib, name="smoothquant-w8a8")  # the smoothquant scheme


def _worker(rank: int, world: int, port: int, out: str, calib: int, method: str = "gptq",
            plain_threads: int = 0) -> None:
    """One rank of a ``world``-rank gloo group, or (``plain_threads`` > 0) one plain process with no
    process group at that many torch threads: the path ``lowbit quantize`` takes without torchrun."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(plain_threads or 1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lowbit
    from lowbit.algorithms._llm import lm_calibration
    from lowbit.models.smollm2 import load_smollm2

    if not plain_threads:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = load_smollm2()
    lm_calibration(model, None, calib)  # tokenizer and calibration text warmed up before the baseline
    loaded_mb = _rss_mb()
    if not plain_threads:
        dist.barrier()  # every rank loaded: the wall clock starts together
    cpu0, w0, t0 = _cpu_s(), _wchar(), time.perf_counter()
    lowbit.quantize(model, _config(method, calib))  # built-in calibration
    cpu, wrote, wall = _cpu_s() - cpu0, _wchar() - w0, time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    layers = model.lowbit_report.extra["gptq"]["layers"] if method == "gptq" else {}
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode() + t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    result = {"rank": rank, "world": world, "loaded_rss_mb": loaded_mb, "peak_rss_mb": peak_mb,
              "growth_mb": peak_mb - loaded_mb, "cpu_s": cpu, "wall_s": wall, "bytes_written": wrote,
              "solves": sum(1 for s in layers.values() if s.get("rank") == rank and "seconds" in s) if layers else None,
              "n_layers": len({k.rsplit(".", 2)[0] for k in layers}) or None, "method": method,
              "sha256": digest.hexdigest(),
              "world_size_recorded": model.lowbit_calibration.get("world_size"), "plain_threads": plain_threads,
              "calibration_sha256": model.lowbit_calibration.get("sha256")}
    if plain_threads:
        result["world"] = 0  # rows sort plain processes first
    else:
        dist.barrier()
        dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hessian_broadcast_bytes(world: int, windows: int) -> float:
    """Bytes one rank sends for the fixed-order Hessian sums of SmolLM2 (h 576, I 1536, 30 layers)."""
    return 30 * (windows / world) * 4 * (3 * 576 ** 2 + 1536 ** 2) * (world - 1)


def main() -> None:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--calib", type=int, default=None, help="512-token calibration windows (default: "
                    + ", ".join(f"{m} {n}" for m, n in DEFAULT_CALIB.items()) + ")")
    ap.add_argument("--method", choices=METHODS, default="gptq")
    ap.add_argument("--plain", type=int, nargs="*", default=[],
                    help="also run one plain process (no process group) at each of these torch thread counts")
    args = ap.parse_args()
    args.calib = args.calib or DEFAULT_CALIB[args.method]
    stem = "distributed_quantize" + ("" if args.method == "gptq" else f"_{args.method}")
    saved = RESULTS / f"{stem}.json"
    old = json.loads(saved.read_text()) if saved.exists() else {}
    # rows of world sizes not rerun now are kept (so each world size can run in its own short locked command)
    rows = [r for r in old.get("rows", []) if (r["world"], r.get("plain_threads", 0)) not in
            {(w, 0) for w in args.worlds} | {(0, t) for t in args.plain}] if old.get("calib") == args.calib else []
    runs = [(0, t) for t in args.plain] + [(w, 0) for w in args.worlds]
    for world, threads in runs:
        load0 = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(_worker, args=(world, _free_port(), out, args.calib, args.method, threads),
                     nprocs=max(world, 1), join=True)
            new = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(max(world, 1))]
        for r in new:  # the machine's 1-minute load average before and after (other agents' jobs included)
            r["loadavg_1m"] = [load0, os.getloadavg()[0]]
        rows += new
        print(new, flush=True)
    rows.sort(key=lambda r: (r["world"], r.get("plain_threads", 0), r["rank"]))
    ranked = [r for r in rows if r["world"] > 0]
    ref = ranked[0]["sha256"] if ranked else None  # the smallest world size's rank 0
    title = {"gptq": "GPTQ W4 g128", "awq": "AWQ W4 g128", "smoothquant": "SmoothQuant W8A8 (alpha 0.6)"}
    gptq = args.method == "gptq"
    md = [f"# SmolLM2-135M {title[args.method]} across gloo ranks (this machine: 2 shared cores)", "",
          f"Command: `.venv/bin/python bench/distributed_quantize.py --method {args.method} --worlds "
          f"{' '.join(str(w) for w in sorted({r['world'] for r in rows if r['world']}))}"
          + (f" --plain {' '.join(str(t) for t in sorted({r['plain_threads'] for r in rows if not r['world']}))}"
             if any(not r["world"] for r in rows) else "") + "` — "
          f"{args.calib} calibration windows of 512 tokens, torch threads 1 per rank, ranks as processes on "
          "127.0.0.1. This machine has 2 cores shared with other agents' jobs: 2 ranks take both, so wall time "
          "measures contention as much as the method, and more ranks than 2 would only time-slice; CPU seconds "
          "are the comparable number.", "",
          "| ranks | rank | peak RSS MB | growth over loaded model MB | CPU s | wall s | bytes written MB | "
          "Hessian broadcast formula MB | linears solved | tensors equal to 1 rank | load avg 1 min before / after |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        formula = (f"{hessian_broadcast_bytes(r['world'], args.calib) / 1e6:,.1f}" if gptq and r["world"] else "-")
        who = r["world"] if r["world"] else f"plain process, {r['plain_threads']} thread(s)"
        md.append(f"| {who} | {r['rank']} | {r['peak_rss_mb']:.0f} | {r['growth_mb']:.0f} | {r['cpu_s']:.1f} | "
                  f"{r.get('wall_s', float('nan')):.1f} | {r['bytes_written'] / 1e6:,.1f} | "
                  f"{formula} | "
                  f"{r['solves'] if gptq and r['world'] else '-'} | {'yes' if r['sha256'] == ref else 'NO'} | "
                  f"{r['loadavg_1m'][0]:.2f} / {r['loadavg_1m'][1]:.2f} |")
    walls = {w: max(r.get("wall_s", float("nan")) for r in rows if r["world"] == w) for w in {r["world"] for r in ranked}}
    cpus = {w: sum(r["cpu_s"] for r in rows if r["world"] == w) for w in walls}
    md += ["", "Per world size (slowest rank's wall, all ranks' CPU): " + "; ".join(
        f"W={w}: wall {walls[w]:.1f} s, CPU {cpus[w]:.1f} s" for w in sorted(walls)) + ".", "",
           "- *peak RSS* is `ru_maxrss`, the process's lifetime maximum (model loading included); *growth*: peak "
           "RSS minus the RSS once the fp32 model and calibration ids are loaded: the quantization's working memory."
           + (" The fixed-order reduction keeps every window's `x^T x` of the rank's windows for one layer: "
              f"`({args.calib} / W) x 13.4 MB`." if gptq else "")]
    if gptq:
        md.append("- *bytes written*: `wchar` during the quantization (gloo's sockets; nothing else writes); the "
                  "formula column counts only the Hessian broadcasts a rank sends, `30 x (windows / W) x 13.4 MB x "
                  "(W - 1)`; the rest is codes and scales of the rank's solves and gloo framing.")
    else:
        md.append("- *bytes written*: `wchar` during the quantization (gloo's sockets). AWQ sends each search "
                  "window's per-channel sums, per-alpha squared errors, the clip sample's rows and the clipped "
                  "weights of the linears a rank searched; SmoothQuant one max all-reduce per linear input. The "
                  "Hessian and solve columns apply to GPTQ only.")
    if any(not r["world"] for r in rows):
        md.append("- *plain process*: `lowbit quantize` without torchrun (no process group) at that many torch threads; "
                  "'equal' compares the sha256 of every tensor of the quantized model with 1 rank's.")
    md += ["- Each rank holds the whole fp32 model (this bench does not combine ranks with `--low-memory`, which GPTQ and AWQ support), so peak RSS "
           "per rank does not fall with W; only the calibration activations and per-window statistics are split.", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"calib": args.calib, "method": args.method, "rows": rows},
                                                     indent=1))
    (RESULTS / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
