"""Decode speed of a QuaRot-rotated 4-bit SmolLM2 on lowbit's fast decoder, against the same scheme unrotated.

    flock /tmp/lowbit-heavy.lock .venv/bin/python bench/rotation_decode.py

Both models: int4 g128 symmetric RTN on the decoder linears (the speed does not depend on how the codes
were chosen: `gptaq-rot` has the same layouts), tied embedding / head int4 too. The rotated one has
QuaRot's rotations folded in first (`lowbit.algorithms.rotation.rotate_model`), so its decoder also runs
the online Hadamard before every `down_proj` (in the C step) and the tied head's `RotatedRMSNorm`.
Greedy decoding of 64 tokens after a short prompt, 2 threads, median of 5 rounds that alternate the
two models; x = rotated / unrotated tokens/s of this run. Writes bench/results/rotation_decode.{md,json}.
"""

from __future__ import annotations

import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import machine, quiet, write_results  # noqa: E402

ROUNDS = 5
NEW_TOKENS = 64


def main() -> None:
    import lowbit
    from lowbit.algorithms.rotation import rotate_model
    from lowbit.algorithms.rtn import WeightOnlyConfig
    from lowbit.models import load_model
    from lowbit.models.decode import Decoder

    quiet()
    torch.set_num_threads(2)
    start = machine()
    fp = load_model("smollm2")
    cfg = WeightOnlyConfig(bits=4, group_size=128, tie_embeddings=True)
    plain = lowbit.quantize(copy.deepcopy(fp), cfg)
    rotated = copy.deepcopy(fp)
    rotate_model(rotated)
    lowbit.quantize(rotated, cfg)
    ids = fp.tokenizer("The Python standard library", return_tensors="pt")["input_ids"]
    decoders = {"int4 g128": Decoder(plain, max_len=256), "int4 g128, QuaRot-rotated": Decoder(rotated, max_len=256)}
    tps = {name: [] for name in decoders}
    for d in decoders.values():
        d.timed_generate(ids, 8)  # warm-up: kernels built, caches allocated
    for _ in range(ROUNDS):
        for name, d in decoders.items():
            tps[name].append(d.timed_generate(ids, NEW_TOKENS)["decode_tps"])
    end = machine()
    base = statistics.median(tps["int4 g128"])
    rows = [{"model": name, "c_step": d._step is not None, "decode_tps": statistics.median(tps[name]),
             "rounds": tps[name], "x": statistics.median(tps[name]) / base} for name, d in decoders.items()]
    md = ["# Decode speed of a QuaRot-rotated SmolLM2 on the fast decoder", "",
          f"`flock /tmp/lowbit-heavy.lock .venv/bin/python bench/rotation_decode.py`: greedy, {NEW_TOKENS} new tokens, "
          f"2 threads, median of {ROUNDS} alternating rounds; load {start['loadavg_1_5_15']} at the start, "
          f"{end['loadavg_1_5_15']} at the end.", "",
          "| model | C step | decode tok/s | x unrotated |", "|---|---|---|---|"]
    md += [f"| {r['model']} | {r['c_step']} | {r['decode_tps']:.1f} | {r['x']:.3f} |" for r in rows]
    write_results("rotation_decode", rows, "\n".join(md) + "\n", {"machine": end})
    print("\n".join(md))


if __name__ == "__main__":
    main()
