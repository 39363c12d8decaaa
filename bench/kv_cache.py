"""KV-cache quantization on SmolLM2-135M: perplexity / KL effect and bytes per cached token.

    .venv/bin/python bench/kv_cache.py [--quick]

Each 512-token evaluation window is fed in chunks of 64 tokens through the cache
(``lowbit.nn.kv_cache.KVCacheLM``), so every chunk attends to the cached past: with a quantized
cache, to keys quantized per channel (per 32-token block) and values per token, except the most
recent 32-63 tokens, which stay full precision (KIVI). Weights are fp32 throughout: only the
cache changes. Baselines: the full forward (no cache) and the same chunked path with transformers'
unquantized DynamicCache. Bytes per token: measured on a filled 512-token cache of SmolLM2's shape
(30 layers x 3 KV heads x 64 dims), codes + fp16 scales/lows + the full-precision window.

Writes bench/results/kv_cache.md and .json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import CachedReference, machine, quiet, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 eval windows instead of all")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    from lowbit.analysis.evaluate import evaluate
    from lowbit.models import load_model
    from lowbit.nn.kv_cache import KVCacheLM, kv_bytes_per_token

    fp = load_model("smollm2")
    ref = CachedReference(fp)
    meta = {"machine": machine(), "quick": args.quick, "chunk": 64, "group": 32, "residual": 32}
    rows = []
    base = evaluate(fp, ref, quick=args.quick)
    rows.append({"name": "fp32, no cache (full forward)", "bits": None, **base})
    for name, kv, bits in [("fp32 DynamicCache, chunked", None, None), ("int8 KV", "int8", 8),
                           ("int4 KV", "int4", 4), ("int2 KV", "int2", 2)]:
        r = evaluate(KVCacheLM(fp, kv), ref, quick=args.quick)
        rows.append({"name": name, "bits": bits, **r})
        print(f"{name}: ppl {r['ppl']:.4f} kl {r['kl']:.5f}", flush=True)
    cfg = fp.lm.config
    for r in rows:
        r["bytes_per_token"] = kv_bytes_per_token(cfg, r["bits"])
    meta["machine_end"] = machine()
    md = render(rows, meta)
    write_results("kv_cache", rows, md, meta)
    print(md)


def render(rows, meta) -> str:
    base = rows[0]
    fp_bytes = rows[0]["bytes_per_token"]
    out = ["# SmolLM2-135M: quantized KV cache (KIVI-style)", "",
           f"Chunked evaluation ({meta['chunk']} tokens per forward) through the cache, context 512 on lm_eval_text"
           f"{' (quick: 2 windows)' if meta['quick'] else ''}; keys per channel per {meta['group']}-token block, "
           f"values per token, {meta['residual']}+ most recent tokens in full precision; weights fp32.", "",
           "| cache | ppl | Δppl vs full forward | KL vs fp32 | bytes / token (512 tokens) | × smaller |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['ppl']:.4f} | {100 * (r['ppl'] / base['ppl'] - 1):+.3f}% | {r['kl']:.5f} | "
                   f"{r['bytes_per_token']:.0f} | {fp_bytes / r['bytes_per_token']:.2f} |")
    m = meta["machine"]
    out += ["", f"Machine: {m['cores']} cores, torch threads {m['torch_threads']}, load {m['loadavg_1_5_15']} "
            "(shared). Bytes per token of the fp32 cache: 2 x 30 x 3 x 64 x 4.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
