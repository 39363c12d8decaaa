"""Calibration method x model: static W8A8 fidelity and calibration time for every observer.

    .venv/bin/python bench/calibration.py                 # digits + MiniLM, all six observers
    .venv/bin/python bench/calibration.py --models digits # digits only (about a minute)

Rows: ``minmax, ema, percentile (99.99), mse, kl, output`` (the output-driven per-layer search,
``output_samples`` calibration samples per loss evaluation). Digits: top-1 accuracy (%) of the
static model (BN folded, per-channel int8 weights; int8 affine, int8 symmetric and int4 affine
activations: at 8 bits this small CNN is saturated, the 4-bit rows separate the observers) on the
450 held-out images, built-in calibration set (256 images). MiniLM: cosine of sentence embeddings vs
fp32 (mean / min) on the fixed 256-sentence evaluation corpus, calibrated on the built-in 128
sentences (disjoint), SmoothQuant alpha searched per layer. ``calib s`` is the wall time of
``lowbit.quantize`` (statistics passes, observers, search, module swap) in this process.

Runs with ``--threads 1`` by default: on the shared 2-core machine two OpenMP threads per process
spin against each other's barriers and make small ops 10x slower. Writes
``bench/results/calibration.md`` and ``.json`` and prints the table, followed by whether the seed
notes' ordering min-max < percentile < MSE < output holds on each model.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

OBSERVERS = ("minmax", "ema", "percentile", "mse", "kl", "output")
ORDER = ("minmax", "percentile", "mse", "output")  # the seed notes' claimed ordering, low to high
RESULTS = Path(__file__).parent / "results"


DIGITS_SETTINGS = ((8, False), (8, True), (4, False))  # (act_bits, symmetric); A4 separates the observers


def digits_rows() -> list[dict]:
    import lowbit
    from lowbit.algorithms.static import StaticConfig
    from lowbit.models import load_model
    from lowbit.models.digits import digits_data

    fp32 = load_model("digits")
    _, _, x, y = digits_data()

    def acc(m):
        with torch.inference_mode():
            return 100.0 * float((m(x).argmax(1) == y).float().mean())

    rows = [{"model": "digits", "observer": "fp32", "activations": "", "accuracy": acc(fp32)}]
    for bits, sym in DIGITS_SETTINGS:
        for obs in OBSERVERS:
            q = copy.deepcopy(fp32)
            start = time.perf_counter()
            lowbit.quantize(q, StaticConfig(observer=obs, symmetric=sym, act_bits=bits))
            rows.append({"model": "digits", "observer": obs, "activations": f"{'sym' if sym else 'affine'} int{bits}",
                         "accuracy": acc(q), "calib_s": time.perf_counter() - start})
            print(rows[-1], flush=True)
    return rows


def minilm_rows(n_eval: int, output_samples: int) -> list[dict]:
    import lowbit
    from lowbit.algorithms.static import StaticConfig
    from lowbit.data import eval_sentences
    from lowbit.models import load_model

    fp32 = load_model("minilm")
    sentences = eval_sentences(n_eval)
    ref = fp32.encode(sentences)
    rows = [{"model": "minilm", "observer": "fp32", "activations": "", "cos_mean": 1.0, "cos_min": 1.0}]
    act = "sym int8"
    for obs in OBSERVERS:
        q = copy.deepcopy(fp32)
        start = time.perf_counter()
        lowbit.quantize(q, StaticConfig(observer=obs, output_samples=output_samples))
        seconds = time.perf_counter() - start
        cos = torch.nn.functional.cosine_similarity(q.encode(sentences), ref, dim=1)
        rows.append({"model": "minilm", "observer": obs, "activations": act, "cos_mean": float(cos.mean()),
                     "cos_min": float(cos.min()), "calib_s": seconds})
        print(rows[-1], flush=True)
        del q
    return rows


def ordering_verdict(rows: list[dict], model: str, metric: str, activations: str) -> str:
    vals = {r["observer"]: r[metric] for r in rows if r["model"] == model and r["activations"] == activations}
    seq = [vals[o] for o in ORDER if o in vals]
    holds = all(a < b for a, b in zip(seq, seq[1:]))
    weak = all(a <= b for a, b in zip(seq, seq[1:]))
    best = max(vals, key=vals.get)
    chain = " , ".join(f"{o} {vals[o]:.4f}" for o in ORDER if o in vals)
    verdict = "holds" if holds else ("holds only with ties" if weak else "does NOT hold")
    return f"{model} ({activations}, {metric}): {chain} -> ordering {verdict}; best observer: {best}"


def to_markdown(rows: list[dict], verdicts: list[str], args) -> str:
    lines = ["# Static W8A8: calibration method x model", "",
             f"Command: `.venv/bin/python bench/calibration.py` "
             f"(threads={args.threads}, MiniLM eval sentences={args.n_eval}, output_samples={args.output_samples})", "",
             "| model | observer | activations | accuracy % | cos mean | cos min | calib s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda k, d=4: "" if r.get(k) is None else f"{r[k]:.{d}f}"  # noqa: E731
        lines.append(f"| {r['model']} | {r['observer']} | {r['activations']} | {f('accuracy', 2)} | {f('cos_mean', 5)} "
                     f"| {f('cos_min', 5)} | {f('calib_s', 1)} |")
    lines += ["", "## Does min-max < percentile < MSE < output hold?", ""] + [f"- {v}" for v in verdicts]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits", "minilm"], choices=["digits", "minilm"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-eval", type=int, default=256, help="MiniLM evaluation sentences")
    ap.add_argument("--output-samples", type=int, default=32, help="calibration samples per output-search loss")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    previous = RESULTS / "calibration.json"
    if previous.is_file():  # keep the other model's rows from an earlier run
        rows = [r for r in json.loads(previous.read_text())["rows"] if r["model"] not in args.models]
    if "digits" in args.models:
        rows += digits_rows()
    if "minilm" in args.models:
        rows += minilm_rows(args.n_eval, args.output_samples)
    verdicts = []
    if any(r["model"] == "digits" for r in rows):
        verdicts += [ordering_verdict(rows, "digits", "accuracy", f"{'sym' if s else 'affine'} int{b}")
                     for b, s in DIGITS_SETTINGS]
    if any(r["model"] == "minilm" for r in rows):
        act = next(r["activations"] for r in rows if r["model"] == "minilm" and r["observer"] != "fp32")
        verdicts += [ordering_verdict(rows, "minilm", m, act) for m in ("cos_mean", "cos_min")]
    RESULTS.mkdir(exist_ok=True)
    md = to_markdown(rows, verdicts, args)
    (RESULTS / "calibration.md").write_text(md)
    (RESULTS / "calibration.json").write_text(json.dumps({"rows": rows, "verdicts": verdicts,
                                                          "args": vars(args)}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
