"""KV-cache quantization on SmolLM2-135M: perplexity / KL effect and bytes per cached token.

    .venv/bin/python bench/kv_cache.py [--quick] [--only "int4 KV,int4 KV, no sink"]

Each 512-token window is fed in chunks of 64 tokens through the cache (``lowbit.nn.kv_cache.KVCacheLM``),
so every chunk attends to the cached past: with a quantized cache, to keys quantized per channel (per
32-token block) and values per token, except the most recent 32-63 tokens, which stay full precision
(KIVI), and the first ``sink`` tokens, kept in full precision for good (the attention sink). Weights
are fp32 throughout: only the cache changes. Scored on the held-out calibration windows 99..106 of the
built-in mix (where the sink default was chosen) and on the three evaluation texts (reported only),
all their windows unless ``--quick``. Baselines: the full forward (no cache) and the same chunked path
with transformers' unquantized DynamicCache. Bytes per token: the mean over cache lengths 512..543 of
SmolLM2's shape (30 layers x 3 KV heads x 64 dims), codes + fp16 scales/lows + the full-precision tokens.

Writes bench/results/kv_cache.md and .json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import CachedReference, machine, quiet, write_results  # noqa: E402

HELD_OUT = range(99, 107)  # calibration windows never fitted by any method (as bench/w4_heldout.py)
# name, cache format (None: transformers' DynamicCache), bits, sink tokens
ROWS = [("fp32 DynamicCache, chunked", None, None, 0), ("int8 KV", "int8", 8, 1),
        ("int4 KV", "int4", 4, 1), ("int4 KV, no sink", "int4", 4, 0), ("int4-rot KV", "int4-rot", 4, 1),
        ("int4-rot KV, no sink", "int4-rot", 4, 0), ("int2 KV", "int2", 2, 1), ("int2 KV, no sink", "int2", 2, 0),
        ("int2-rot KV", "int2-rot", 2, 1)]
# suffix of the ppl / kl keys, label
TEXTS = (("_calib", "held-out calibration"), ("", "licence"), ("_heldout", "held-out docs"), ("_science", "science"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 licence windows, 1 of each other text")
    ap.add_argument("--only", default=None, help="comma-separated row names (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    from lowbit.algorithms._calib import default_calibration
    from lowbit.analysis.evaluate import evaluate, lm_scores
    from lowbit.models import load_model
    from lowbit.nn.kv_cache import DEFAULT_GROUP, DEFAULT_RESIDUAL, KVCacheLM, kv_bytes_per_token

    fp = load_model("smollm2")
    ref = CachedReference(fp)
    held = torch.cat(default_calibration(fp, HELD_OUT.stop)[HELD_OUT.start:HELD_OUT.stop])  # (8, 512)
    if args.quick:
        held = held[:2]
    meta = {"machine": machine(), "quick": args.quick, "chunk": 64, "group": DEFAULT_GROUP,
            "residual": DEFAULT_RESIDUAL}

    def scores(model) -> dict:
        r = evaluate(model, ref, quick=args.quick)
        c = lm_scores(model, ref, held)
        return {**r, "ppl_calib": c["ppl"], "kl_calib": c["kl"]}

    rows = [{"name": "fp32, no cache (full forward)", "bits": None, "sink": 0, **scores(fp)}]
    wanted = None if args.only is None else {s.strip() for s in args.only.split(",")}
    for name, kv, bits, sink in ROWS:
        if wanted is not None and name not in wanted:
            continue
        r = scores(KVCacheLM(fp, kv, sink=sink))
        rows.append({"name": name, "kv": kv, "bits": bits, "sink": sink, **r})
        print(name, {k: round(v, 5) for k, v in r.items() if k.startswith(("ppl", "kl"))}, flush=True)
    cfg = fp.lm.config
    for r in rows:
        r["bytes_per_token"] = kv_bytes_per_token(cfg, r["bits"], sink=r["sink"])
    meta["machine_end"] = machine()
    md = render(rows, meta)
    write_results("kv_cache", rows, md, meta)
    print(md)


def render(rows, meta) -> str:
    base = rows[0]
    fp_bytes = rows[0]["bytes_per_token"]
    head = " | ".join(f"{label} ppl ratio | KL" for _, label in TEXTS)
    last = meta["residual"] + meta["group"] - 1
    windows = (" (quick: 2 windows of the calibration and licence texts, 1 of the others)" if meta["quick"]
               else ", all windows")
    out = ["# SmolLM2-135M: quantized KV cache (KIVI-style, with an attention sink)", "",
           f"Chunked evaluation ({meta['chunk']} tokens per forward) through the cache, context 512; keys per channel "
           f"per {meta['group']}-token block, values per token, the {meta['residual']}-{last} most recent tokens and "
           "the first `sink` tokens in full precision; weights fp32. Perplexity as a ratio to the full forward's on "
           "the held-out calibration windows 99..106 of the built-in mix (the sink default was chosen there) and on "
           f"the three evaluation texts{windows}. Bytes per token: the mean over cache lengths 512-543.", "",
           f"| cache | sink | {head} | bytes / token | x smaller |",
           "|---|---|" + "---|---|" * len(TEXTS) + "---|---|"]
    for r in rows:
        cells = " | ".join(f"{r[f'ppl{s}'] / base[f'ppl{s}']:.4f} | {r[f'kl{s}']:.5f}" for s, _ in TEXTS)
        out.append(f"| {r['name']} | {r['sink']} | {cells} | {r['bytes_per_token']:.0f} | "
                   f"{fp_bytes / r['bytes_per_token']:.2f} |")
    m, e = meta["machine"], meta["machine_end"]
    fp_ppl = ", ".join(f"{label} {base[f'ppl{s}']:.3f}" for s, label in TEXTS)
    out += ["", f"fp32 perplexities: {fp_ppl}.",
            f"Machine: {m['cores']} cores, torch threads {m['torch_threads']}, load {m['loadavg_1_5_15']} at the start, "
            f"{e['loadavg_1_5_15']} at the end (perplexities, not timings). Bytes per token of the fp32 cache: "
            "2 x 30 x 3 x 64 x 4.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
