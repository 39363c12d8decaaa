"""Mixed precision on the real models: ILP vs uniform vs greedy at equal size, the Pareto front of size
and latency against fidelity with several allocations actually quantized and measured, and the
latency-constrained solution's measured latency against its prediction.

    .venv/bin/python bench/mixed_precision.py [--models minilm smollm2] [--quick]

Writes bench/results/mixed_precision.{md,json} and bench/results/pareto_<model>.png.
Fidelity is measured on evaluation data (MiniLM: 256 eval sentences, drift = 1 - mean cos vs fp32;
SmolLM2: 4 windows of 512 tokens of the licence text, drift = mean next-token KL vs fp32, plus ppl);
sensitivity is measured on the disjoint calibration data. Latency: single-thread CPU time of the
model's fixed workload (``time.thread_time``; this 2-core machine is shared, wall time is not
reproducible), median of repeats with the interquartile range.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import lowbit  # noqa: E402
from lowbit.algorithms.mixed import MixedPrecisionConfig  # noqa: E402
from lowbit.analysis.footprint import model_size_bytes  # noqa: E402
from lowbit.mixed.allocate import build_problem, greedy, pareto_front, solve_ilp, uniform  # noqa: E402
from lowbit.mixed.profile import (HardwareProfile, default_profile_path, new_profile, profile_model,  # noqa: E402
                                  measure_model_forward)
from lowbit.mixed.sensitivity import cached_sensitivity  # noqa: E402
from lowbit.models import load_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("bench.mixed")

SETTINGS = {
    "minilm": dict(choices=("w2", "w3", "w4", "w8", "w8a8"), group_by="layer", n_calib=64, max_tokens=None,
                   equal_size=("w3", "w4"), pareto_points=5, eval_windows=None, repeats=7),
    # SmolLM2: one precision per decoder block (30 units), one 128-token calibration window, 2 eval
    # windows, fewer timed repeats: the shared machine gave this run ~20% of one core
    "smollm2": dict(choices=("w3", "w4", "w8", "w8a8"), group_by="block", n_calib=1, max_tokens=128,
                    equal_size=("w4", "w8"), pareto_points=3, eval_windows=2, repeats=5),
}


class Fidelity:
    """Drift of a model against fp32 on evaluation data (reference outputs computed once)."""

    def __init__(self, fp32, quick: bool, windows: int | None = None):
        self.task = fp32.task
        if self.task == "encoder":
            from lowbit.data import eval_sentences

            self.sentences = eval_sentences(64 if quick else 256)
            self.ref = fp32.encode(self.sentences, batch_size=32)
        else:
            from lowbit.analysis.evaluate import lm_windows
            from lowbit.data import lm_eval_text

            self.windows = lm_windows(fp32.tokenizer, lm_eval_text(), 512, max_windows=2 if quick else (windows or 4))
            with torch.inference_mode():
                self.ref = [torch.log_softmax(fp32(w[None])[0, :-1].float(), -1) for w in self.windows]

    def __call__(self, model) -> dict:
        if self.task == "encoder":
            emb = model.encode(self.sentences, batch_size=32)
            cos = torch.nn.functional.cosine_similarity(emb, self.ref, dim=1)
            return {"drift": float(1 - cos.mean()), "cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
        kl, nll, n = 0.0, 0.0, 0
        with torch.inference_mode():
            for w, r in zip(self.windows, self.ref):
                lp = torch.log_softmax(model(w[None])[0, :-1].float(), -1)
                kl += float((r.exp() * (r - lp)).sum())
                nll += float(-lp.gather(1, w[1:, None]).sum())
                n += len(w) - 1
        return {"drift": kl / n, "kl": kl / n, "ppl": math.exp(nll / n)}


def quantized(fp32, problem, alloc, kernel="auto"):
    m = copy.deepcopy(fp32)
    plan = problem.layer_assignment(alloc.assignment)
    if all(c == "fp32" for c in plan.values()):
        return m
    lowbit.quantize(m, MixedPrecisionConfig(assignment=tuple(plan.items()), kernel=kernel))
    return m


def measure(fp32, problem, alloc, fid, latency: bool = False, repeats: int = 7) -> dict:
    t0 = time.time()
    m = quantized(fp32, problem, alloc)
    row = {"method": alloc.method, "pred_size_mb": alloc.size_mb, "size_mb": model_size_bytes(m) / 1e6,
           "pred_drift": alloc.loss, "pred_latency_ms": None if alloc.latency_us is None else alloc.latency_us / 1e3,
           "counts": alloc.counts(), **fid(m)}
    if latency:
        t = measure_model_forward(m, threads=1, clock="thread", repeats=repeats)
        row.update(latency_ms=t["median"] / 1e3, latency_iqr_ms=(t["q3"] - t["q1"]) / 1e3)
        if row["pred_latency_ms"]:
            row["latency_err_pct"] = 100 * (row["latency_ms"] / row["pred_latency_ms"] - 1)
    log.info("%s: %s (%.0f s)", alloc.method, {k: v for k, v in row.items() if k != "counts"}, time.time() - t0)
    return row


def save_profile(profile: HardwareProfile, path: Path | None = None) -> None:
    """Merge into the file on disk first: another bench process may have profiled other models."""
    path = path or default_profile_path()
    if path.is_file():
        disk = HardwareProfile.load(path, check=False)
        disk.merge(profile)
        profile.latency_us, profile.switch_us, profile.models = disk.latency_us, disk.switch_us, disk.models
    profile.save(path)


def run_model(name: str, quick: bool, profile: HardwareProfile) -> dict:
    s = SETTINGS[name]
    fp32 = load_model(name)
    t0 = time.time()
    report = cached_sensitivity(fp32, choices=s["choices"], group_by=s["group_by"], n_calib=s["n_calib"],
                                max_tokens=s["max_tokens"], hessian_samples=0)
    log.info("%s sensitivity: %d units x %d choices in %.0f s (0 if cached)", name, len(report.units),
             len(report.choices), time.time() - t0)
    if name not in profile.models:
        profile_model(fp32, profile, repeats=9 if quick else 15)
        save_profile(profile)
    problem = build_problem(fp32, report, profile)
    fid = Fidelity(fp32, quick, s["eval_windows"])
    reps = s["repeats"]
    out = {"model": name, "units": len(problem.units), "group_by": s["group_by"], "choices": problem.choices,
           "metric": report.metric, "calibration": report.calibration, "fp32_size_mb": model_size_bytes(fp32) / 1e6,
           "equal_size": [], "pareto": [], "latency": []}

    # 1. equal size: uniform vs ILP vs greedy
    for c in s["equal_size"]:
        u = uniform(problem, c)
        budget = u.size_mb
        rows = [measure(fp32, problem, u, fid),
                measure(fp32, problem, solve_ilp(problem, "loss", max_size_mb=budget), fid),
                measure(fp32, problem, greedy(problem, budget), fid)]
        out["equal_size"].append({"budget_mb": budget, "uniform": c, "rows": rows})

    # 2. Pareto front (predicted) with a few points quantized and measured (size, latency, drift)
    lo = min(uniform(problem, c).size_mb for c in problem.choices if c != "fp32")
    hi = uniform(problem, "fp32").size_mb
    front = pareto_front(problem, list(np.geomspace(lo, hi, 40)))
    out["pareto_predicted"] = [{"size_mb": a.size_mb, "drift": a.loss, "latency_ms": a.latency_us / 1e3}
                               for a in front]
    k = s["pareto_points"]
    picks = sorted({int(round(i)) for i in np.linspace(0, len(front) - 2, k)})
    for i in picks:
        front[i].method = f"ilp-front-{front[i].size_mb:.1f}MB"
        out["pareto"].append(measure(fp32, problem, front[i], fid, latency=True, repeats=reps))

    # 3. latency-constrained: min predicted latency s.t. predicted drift <= uniform w4 / w8 drift
    for c in ("w4", "w8"):
        thr = uniform(problem, c).loss
        a = solve_ilp(problem, "latency", max_loss=thr)
        a.method = f"min-latency s.t. drift <= uniform {c}"
        row = measure(fp32, problem, a, fid, latency=True, repeats=reps)
        row["threshold"] = thr
        out["latency"].append(row)
    for c in ("fp32", "w8a8", "w4"):
        out["latency"].append(measure(fp32, problem, uniform(problem, c), fid, latency=True, repeats=reps))
    out["rest_ms"] = profile.models[name]["rest_us"] / 1e3
    out["tokens"] = profile.models[name]["tokens"]
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    pf = res["pareto_predicted"]
    a1.plot([p["size_mb"] for p in pf], [p["drift"] for p in pf], "-", color="0.6", label="ILP front (predicted)")
    a2.plot([p["latency_ms"] for p in pf], [p["drift"] for p in pf], ".", color="0.6", label="ILP front (predicted)")
    for r in res["pareto"]:
        a1.plot(r["size_mb"], r["drift"], "o", color="C0")
        a2.plot(r["latency_ms"], r["drift"], "o", color="C0")
        a2.plot(r["pred_latency_ms"], r["drift"], "x", color="C0")
    a1.plot([], [], "o", color="C0", label="ILP, quantized + measured")
    marks = {"uniform": ("s", "C1"), "ilp": ("^", "C2"), "greedy": ("v", "C3")}
    for group in res["equal_size"]:
        for r in group["rows"]:
            m, col = marks[r["method"].split("-")[0]]
            a1.plot(r["size_mb"], r["drift"], m, color=col)
    for key, (m, col) in marks.items():
        a1.plot([], [], m, color=col, label=f"{key} (equal size, measured)")
    for r in res["latency"]:
        a2.plot(r["latency_ms"], r["drift"], "s", color="C3" if "min-latency" in r["method"] else "C1")
    a2.plot([], [], "x", color="C0", label="predicted latency of the measured points")
    a2.plot([], [], "s", color="C3", label="latency-constrained ILP (measured)")
    a2.plot([], [], "s", color="C1", label="uniform fp32 / w8a8 / w4 (measured)")
    for a in (a1, a2):
        a.set_yscale("log")
        a.set_ylabel(f"drift vs fp32 ({res['metric']}, eval data)")
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    a1.set_xlabel("model size (MB)")
    a2.set_xlabel(f"latency (ms, 1 thread CPU time, {res['tokens']} tokens)")
    fig.suptitle(f"{res['model']}: mixed precision Pareto front")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(v, d=4):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{d}g}"
    return str(v)


def markdown(results: list[dict], machine: dict) -> str:
    lines = ["# Mixed precision: ILP vs uniform vs greedy, Pareto front, latency prediction", "",
             f"Machine: {machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}; latency = CPU time of "
             "one thread (`time.thread_time`), median of 7 runs (IQR shown).",
             "Reproduce: `.venv/bin/python bench/mixed_precision.py`", ""]
    for r in results:
        m = r["model"]
        lines += [f"## {m} ({r['units']} units by {r['group_by']}, choices {', '.join(r['choices'])}; "
                  f"drift = {r['metric']} on eval data)", "",
                  f"fp32 size {r['fp32_size_mb']:.2f} MB. Sensitivity on calibration data: "
                  f"{r['calibration'].get('n_samples')} samples ({r['calibration'].get('source')}).", "",
                  "### Equal size", "",
                  "| budget MB | method | size MB | predicted drift | measured drift | cos mean / ppl | allocation |",
                  "|---|---|---|---|---|---|---|"]
        for g in r["equal_size"]:
            for row in g["rows"]:
                extra = fmt(row.get("cos_mean"), 6) if "cos_mean" in row else fmt(row.get("ppl"), 5)
                lines.append(f"| {g['budget_mb']:.2f} | {row['method']} | {row['size_mb']:.2f} | "
                             f"{fmt(row['pred_drift'])} | {fmt(row['drift'])} | {extra} | "
                             f"{', '.join(f'{k}:{v}' for k, v in sorted(row['counts'].items()))} |")
        lines += ["", "### Pareto points, quantized and measured", "",
                  "| point | size MB (pred / measured) | drift (pred / measured) | latency ms (pred / measured ± IQR) | error |",
                  "|---|---|---|---|---|"]
        for row in r["pareto"] + r["latency"]:
            lines.append(f"| {row['method']} | {row['pred_size_mb']:.2f} / {row['size_mb']:.2f} | "
                         f"{fmt(row['pred_drift'])} / {fmt(row['drift'])} | {fmt(row['pred_latency_ms'])} / "
                         f"{fmt(row['latency_ms'])} ± {fmt(row['latency_iqr_ms'], 2)} | "
                         f"{fmt(row.get('latency_err_pct'), 3)}% |")
        errs = [abs(x["latency_err_pct"]) for x in r["pareto"] + r["latency"] if x.get("latency_err_pct") is not None]
        lines += ["", f"Latency model (rest {r['rest_ms']:.1f} ms + per-layer table + switching): mean |error| "
                  f"{np.mean(errs):.1f}%, max {np.max(errs):.1f}% over {len(errs)} measured allocations.", "",
                  f"![pareto](pareto_{m}.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = default_profile_path()
    profile = HardwareProfile.load(path) if path.is_file() else new_profile()
    mine = []
    old = RESULTS / "mixed_precision.json"
    for name in args.models:
        res = run_model(name, args.quick, profile)
        mine.append(res)
        plot(res, RESULTS / f"pareto_{name}.png")
        results = []
        if old.is_file():  # keep other models' results (an earlier run, or a concurrent one)
            results = [r for r in json.loads(old.read_text()).get("results", []) if r["model"] not in args.models]
        results = sorted(results + mine, key=lambda r: r["model"])
        (RESULTS / "mixed_precision.json").write_text(json.dumps({"machine": profile.machine, "results": results},
                                                                 indent=1, default=str))
        md = markdown(results, profile.machine)
        (RESULTS / "mixed_precision.md").write_text(md)
    save_profile(profile)
    save_profile(profile, RESULTS / "profile.json")
    print(md)


if __name__ == "__main__":
    main()
