"""Input-adaptive precision on MiniLM: fidelity-speed trade-off against fixed 4-bit and fixed 8-bit.

    .venv/bin/python bench/adaptive.py [--quick]

One model holds an int4 (g64) and an int8 (per-channel) weight-only path per linear
(``lowbit.mixed.adaptive``). Fixed 4-bit / 8-bit are the same model with the mode switch set to
``fast`` / ``accurate``. The router is fitted on the 128 calibration sentences (never on evaluation
data) for several target fractions ``p`` of inputs sent to 8-bit; evaluation uses the 256 eval
sentences. Also shown: an oracle router (the true per-sentence 4-bit error, unavailable at run time)
and a random router at the same ``p``. Speed: encoding all eval sentences at batch 32, tokenization
and the router's features included, CPU time of one thread (``time.thread_time``; the machine is
shared), median of repeats taken round-robin.

Writes bench/results/adaptive.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lowbit.data import calib_sentences, eval_sentences  # noqa: E402
from lowbit.mixed.adaptive import (ComplexityRouter, adaptive_encode, make_adaptive,  # noqa: E402
                                   per_sentence_error, sentence_features, set_mode)
from lowbit.core.threads import torch_threads  # noqa: E402
from lowbit.models import load_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FRACTIONS = (0.1, 0.2, 0.3, 0.5)
log = logging.getLogger("bench.adaptive")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    fp32 = load_model("minilm")
    model = make_adaptive(copy.deepcopy(fp32))
    calib = calib_sentences(128)
    ev = eval_sentences(64 if args.quick else 256)
    ref = fp32.encode(ev, batch_size=32)
    err4 = per_sentence_error(model, ref, ev, "fast")
    err8 = per_sentence_error(model, ref, ev, "accurate")
    feats = sentence_features(model.tokenizer, ev)

    def fid(err):
        cos = 1 - np.asarray(err)
        return {"drift": float(1 - cos.mean()), "cos_mean": float(cos.mean()), "cos_min": float(cos.min())}

    rows = {"fixed 4-bit (mode fast)": {**fid(err4), "frac_8bit": 0.0},
            "fixed 8-bit (mode accurate)": {**fid(err8), "frac_8bit": 1.0}}
    routers = {}
    rng = np.random.default_rng(0)
    calib_err = per_sentence_error(model, fp32.encode(calib, batch_size=32), calib, "fast")
    calib_feats = sentence_features(model.tokenizer, calib)
    for p in FRACTIONS:
        r = ComplexityRouter.fit(calib_feats, calib_err, p)  # = fit_router(model, fp32, calib, p)
        routers[p] = r
        hard = r.hard(feats)
        rows[f"adaptive p={p}"] = {**fid(np.where(hard, err8, err4)), "frac_8bit": float(hard.mean()),
                                   "feature": r.feature, "spearman_calib": r.spearman}
        k = int(round(p * len(ev)))
        oracle = np.zeros(len(ev), bool)
        oracle[np.argsort(-err4)[:k]] = True
        rows[f"oracle p={p}"] = {**fid(np.where(oracle, err8, err4)), "frac_8bit": p}
        rand = rng.permutation(len(ev)) < k
        rows[f"random p={p}"] = {**fid(np.where(rand, err8, err4)), "frac_8bit": p}
    # check the routed encode gives exactly the per-path embeddings (no cross-talk between modes)
    emb, hard = adaptive_encode(model, ev, routers[0.3])
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=1).numpy()
    assert np.allclose(1 - cos, np.where(hard, err8, err4), atol=1e-4)

    # speed, round-robin
    runs = {"fp32": lambda: fp32.encode(ev, batch_size=32)}

    def fixed(mode):
        def run():
            set_mode(model, mode)
            model.encode(ev, batch_size=32)
        return run

    runs["fixed 4-bit (mode fast)"] = fixed("fast")
    runs["fixed 8-bit (mode accurate)"] = fixed("accurate")
    for p in FRACTIONS:
        runs[f"adaptive p={p}"] = (lambda r: lambda: adaptive_encode(model, ev, r))(routers[p])
    times = {k: [] for k in runs}
    with torch_threads(1):
        for k in runs:  # warm-up (kernel layouts built on first use)
            runs[k]()
        for _ in range(args.repeats):
            for k, fn in runs.items():
                start = time.thread_time()
                fn()
                times[k].append(time.thread_time() - start)
    for k, ts in times.items():
        rows.setdefault(k, {})
        q1, med, q3 = np.quantile(ts, [0.25, 0.5, 0.75])
        rows[k].update(seconds=float(med), seconds_iqr=float(q3 - q1), sps=len(ev) / float(med))

    d4, d8 = rows["fixed 4-bit (mode fast)"]["drift"], rows["fixed 8-bit (mode accurate)"]["drift"]
    t4, t8 = rows["fixed 4-bit (mode fast)"]["seconds"], rows["fixed 8-bit (mode accurate)"]["seconds"]
    for k, r in rows.items():
        r["fidelity_closer_to_8bit"] = r["drift"] < (d4 + d8) / 2 if "drift" in r else None
        r["speed_closer_to_4bit"] = r["seconds"] < (t4 + t8) / 2 if "seconds" in r else None
    feature_corr = {f: float(np.corrcoef(np.argsort(np.argsort(v)), np.argsort(np.argsort(err4)))[0, 1])
                    for f, v in feats.items()}
    out = {"n_eval": len(ev), "n_calib": len(calib), "rows": rows, "feature_spearman_eval": feature_corr,
           "routers": {str(p): r.__dict__ for p, r in routers.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "adaptive.json").write_text(json.dumps(out, indent=1, default=float))
    lines = ["# Input-adaptive precision (MiniLM): 4-bit base + 8-bit path, routed per sentence", "",
             "Reproduce: `.venv/bin/python bench/adaptive.py`. Eval: "
             f"{len(ev)} sentences; router fitted on {len(calib)} calibration sentences. Time: encode all eval "
             "sentences at batch 32 incl. tokenization and router features, 1-thread CPU time, median of "
             f"{args.repeats} round-robin repeats.", "",
             "| config | to 8-bit | drift (1 - cos mean) | cos min | seconds (± IQR) | sentences/s | "
             "fidelity closer to 8-bit | speed closer to 4-bit |", "|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r.get('frac_8bit', 1.0 if k == 'fp32' else 0):.2f} | "
                     f"{r['drift']:.3g} | {r['cos_min']:.4f} | " if "drift" in r else f"| {k} | — | 0 | 1 | ")
        if "seconds" in r:
            lines[-1] += (f"{r['seconds']:.2f} ± {r['seconds_iqr']:.2f} | {r['sps']:.1f} | "
                          f"{r['fidelity_closer_to_8bit']} | {r['speed_closer_to_4bit']} |")
        else:
            lines[-1] += f"— | — | {r['fidelity_closer_to_8bit']} | (not timed: offline routing bound) |"
    lines += ["", "Rank correlation (Spearman) of each cheap feature with the per-sentence 4-bit error on the eval "
              "sentences: " + ", ".join(f"{k} {v:+.2f}" for k, v in feature_corr.items()) + ".", ""]
    (RESULTS / "adaptive.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
