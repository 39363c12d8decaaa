"""SmolLM2-135M benchmark: fp32 vs lowbit int8 and int4 weight-only, in ONE run.

    .venv/bin/python bench/smollm2.py [--rounds 3] [--new-tokens 128] [--quick]

Per configuration: perplexity and mean KL vs fp32 at context 512 on the fixed licence text
(``lowbit.analysis.evaluate``), exact size, prefill tokens/s (one 512-token forward) and greedy
decode tokens/s (``generate`` with 128 new tokens, KV cache on). Speed is measured round-robin over
``--rounds`` rounds and the best round counts (the machine is shared and noisy).

SmolLM2's weights were dequantized from Q4_1 (4-bit, blocks of 32, asymmetric), so 4-bit g32
asymmetric RTN would reproduce them almost exactly; the int4 rows here use g128 (and symmetric),
which is off that grid. Writes ``bench/results/smollm2.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from pathlib import Path

import torch

import lowbit
from lowbit.analysis.evaluate import evaluate
from lowbit.algorithms.rtn import WeightOnlyConfig
from lowbit.io.atomic import atomic_write_text
from lowbit.models import load_model

log = logging.getLogger("bench.smollm2")
RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The licence grants permission to use, copy and modify the software provided that"

# name -> list of configs applied in order (later ones see the layers earlier ones left in float).
CONFIGS = {
    "fp32": [],
    "lowbit-int8-weight-only": [WeightOnlyConfig(bits=8, group_size=0)],
    "lowbit-int4-g128-sym": [WeightOnlyConfig(bits=4, group_size=128, symmetric=True)],
    "lowbit-int4-g128-affine": [WeightOnlyConfig(bits=4, group_size=128, symmetric=False)],
    # The tied LM head (49152 x 576, a fifth of the weights) is the most sensitive layer at 4 bits.
    "lowbit-int4-g128-affine+head-int8": [WeightOnlyConfig(bits=4, group_size=128, symmetric=False,
                                                           exclude=("lm.lm_head",)),
                                          WeightOnlyConfig(bits=8, group_size=0, include=("lm.lm_head",))],
}


def decode_tps(model, ids: torch.Tensor, new_tokens: int) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model.lm.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return new_tokens / (time.perf_counter() - start)


def prefill_tps(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(ids)
        return ids.shape[1] / (time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="SmolLM2: fp32 vs lowbit weight-only, one run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="2 ppl windows, 32 tokens, 1 round")
    p.add_argument("--quick-ppl", action="store_true", help="perplexity/KL on 2 windows instead of all 7")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens, args.quick_ppl = 1, 32, True
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    fp32 = load_model("smollm2")
    models = {}
    for name, configs in CONFIGS.items():
        m = fp32 if not configs else copy.deepcopy(fp32)
        for cfg in configs:
            lowbit.quantize(m, cfg)
        models[name] = m
    rows = {}
    for name, m in models.items():
        r = evaluate(m, fp32, quick=args.quick_ppl)
        rows[name] = {"config": name, "ppl": r["ppl"], "kl": r["kl"], "size_mb": r["size_bytes"] / 1e6,
                      "bits_per_weight": r["bits_per_weight"], "prefill_tps": 0.0, "decode_tps": 0.0}
        log.info("%s: ppl %.3f kl %.4f %.1f MB", name, r["ppl"], r["kl"], r["size_bytes"] / 1e6)
    prompt = fp32.tokenizer(PROMPT, return_tensors="pt").input_ids
    window = fp32.tokenizer(" ".join([PROMPT] * 64), return_tensors="pt").input_ids[:, :512]
    for m in models.values():  # warm-up: kernel layouts, allocator
        decode_tps(m, prompt, 4)
    for rnd in range(args.rounds):
        for name, m in models.items():
            row = rows[name]
            row["decode_tps"] = max(row["decode_tps"], decode_tps(m, prompt, args.new_tokens))
            row["prefill_tps"] = max(row["prefill_tps"], prefill_tps(m, window))
        log.info("round %d/%d done", rnd + 1, args.rounds)
    out = list(rows.values())
    base = rows["fp32"]
    for r in out:
        r["decode_x_fp32"] = r["decode_tps"] / base["decode_tps"]
        r["prefill_x_fp32"] = r["prefill_tps"] / base["prefill_tps"]
    lines = [
        "# SmolLM2-135M: lowbit weight-only vs fp32", "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, ppl/KL at context 512 on the CPython licence "
        f"({'2 windows' if args.quick_ppl else 'all 7 windows'}), greedy decode of {args.new_tokens} tokens, best of "
        f"{args.rounds} round-robin rounds, 1-min load average at the end {os.getloadavg()[0]:.1f}. "
        "Weights came from Q4_1 (4-bit g32 asymmetric): g128 rows are off that grid. Command: `python bench/smollm2.py`.",
        "", "| config | ppl | KL vs fp32 | MB | bits/weight | prefill tok/s | decode tok/s | decode × fp32 |",
        "|---|---|---|---|---|---|---|---|"]
    for r in out:
        lines.append(f"| {r['config']} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['size_mb']:.1f} | {r['bits_per_weight']:.2f} "
                     f"| {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | {r['decode_x_fp32']:.2f} |")
    md = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "smollm2.json", json.dumps(out, indent=2))
    atomic_write_text(RESULTS / "smollm2.md", md)
    print(md)


if __name__ == "__main__":
    main()
