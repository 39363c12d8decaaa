"""Peak memory of layer-by-layer quantization vs the whole-model path, SmolLM2-135M, GPTQ W4 g128.

    .venv/bin/python bench/sequential_memory.py [--calib 4]

Three separate subprocesses (so one's allocations cannot hide in another's peak), each reporting
``ru_maxrss`` (peak resident set) and its own baseline, the RSS after imports + tokenizer:

- ``whole``: load the fp32 model (``load_smollm2``), GPTQ it in place (decoder layers processed in
  order, but every float layer resident from the start);
- ``sequential``: ``quantize_from_safetensors``: skeleton on ``meta``, embeddings loaded, each
  decoder layer read from the cached safetensors file, quantized, its float weights dropped;
- ``imports``: the baseline alone.

Target: sequential peak - baseline <= quantized model + 2 decoder layers (fp32) + calibration
activations. Writes bench/results/sequential_memory.md and .json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, calib: int) -> None:
    import torch

    torch.set_num_threads(1)
    from lowbit.algorithms._calib import default_calibration
    from lowbit.algorithms.gptq import GPTQConfig, make_gptq_process
    from lowbit.analysis.footprint import model_size_bytes
    from lowbit.api import QuantizeReport
    from lowbit.models.smollm2 import _cache_path, load_smollm2, smollm2_gguf
    from lowbit.algorithms.sequential import quantize_from_safetensors, smollm2_skeleton

    folder = _cache_path(smollm2_gguf())
    if not folder.is_dir():
        load_smollm2()  # builds the cache (not measured: run the bench twice if it was missing)
    skel = smollm2_skeleton(folder)
    batches = default_calibration(skel, calib)
    import gc

    gc.collect()
    base = _rss_mb()
    out = {"mode": mode, "baseline_rss_mb": base}
    if mode == "imports":
        pass
    else:
        cfg = GPTQConfig(bits=4, group_size=128, n_calib=calib)
        rep = QuantizeReport()
        if mode == "whole":
            import lowbit

            model = load_smollm2()
            out["fp32_model_mb"] = model_size_bytes(model) / 1e6
            lowbit.quantize(model, cfg, batches)
        else:
            model = quantize_from_safetensors(folder, make_gptq_process(cfg, "lm.model.layers", rep, {}), batches,
                                              skeleton=skel)
        out["quantized_model_mb"] = model_size_bytes(model) / 1e6
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--calib", type=int, default=4, help="512-token windows (GPTQ needs >= 3 for 1536 inputs)")
    ap.add_argument("--modes", default="imports,sequential,whole",
                    help="subset to re-measure; the others are kept from the last results file")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.calib)
        return
    from bench._llm_common import machine, write_results

    old = {}
    prev = Path(__file__).resolve().parent / "results" / "sequential_memory.json"
    if prev.is_file():
        old = {r["mode"]: r for r in json.loads(prev.read_text())["rows"]}
    rows = []
    for mode in ("imports", "sequential", "whole"):
        if mode not in args.modes.split(","):
            if mode in old:
                rows.append(old[mode])
            continue
        print(f"... {mode}", flush=True)
        p = subprocess.run([sys.executable, __file__, "--child", mode, "--calib", str(args.calib)],
                           capture_output=True, text=True)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{mode} failed:\n{p.stderr[-3000:]}")
        rows.append(json.loads(line[7:]))
        print(rows[-1], flush=True)
    # Budget terms, from the architecture: one fp32 decoder layer, calibration activations.
    hidden, inter, layers, tokens = 576, 1536, 30, args.calib * 512
    layer_mb = 4 * (hidden * (576 + 192 + 192 + 576) + 3 * hidden * inter + 2 * hidden) / 1e6
    acts_mb = 4 * tokens * hidden * 2 / 1e6  # layer inputs + outputs kept at once
    # Inside one window's forward through a layer (per token): q, o-in, o-out, residual, norm (5C),
    # k, v (2 x 192), k, v expanded to the 9 query heads (2C), down-out + residual (2C), gate, up,
    # act(gate), act * up (4I). An upper bound: PyTorch frees some of them before others exist.
    window_mb = 4 * 512 * (9 * hidden + 2 * 192 + 4 * inter) / 1e6
    hessians_mb = 4 * (3 * hidden * hidden + inter * inter) / 1e6  # q/k/v, o, gate/up: K=576; down: K=1536
    seq = next(r for r in rows if r["mode"] == "sequential")
    whole = next(r for r in rows if r["mode"] == "whole")
    budget = seq["quantized_model_mb"] + 2 * layer_mb + acts_mb
    meta = {"machine": machine(), "calib_windows": args.calib, "layer_fp32_mb": layer_mb,
            "calib_activations_mb": acts_mb, "budget_mb": budget, "window_intermediates_mb": window_mb,
            "hessians_mb": hessians_mb}
    md = ["# Sequential (layer-by-layer) vs whole-model GPTQ W4 g128: peak RSS, SmolLM2-135M", "",
          "Separate subprocesses; growth = peak RSS - RSS after imports/tokenizer/calibration ids in the same process.", "",
          "| path | peak RSS MB | growth over baseline MB | quantized model MB |", "|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['mode']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} | "
                  f"{r.get('quantized_model_mb', 0):.1f} |")
    growth = seq["peak_rss_mb"] - seq["baseline_rss_mb"]
    md += ["", f"Budget (target): quantized model {seq['quantized_model_mb']:.1f} MB (fp32 embeddings included) + "
           f"2 fp32 decoder layers {2 * layer_mb:.1f} MB + calibration activations {acts_mb:.1f} MB = {budget:.1f} MB; "
           f"sequential growth {growth:.0f} MB -> {'met' if growth <= budget else 'missed'}. "
           f"Whole-model growth {whole['peak_rss_mb'] - whole['baseline_rss_mb']:.0f} MB "
           f"(fp32 model {whole.get('fp32_model_mb', 0):.0f} MB).", "",
           f"What the literal budget leaves out: the intermediate activations of one 512-token window inside a "
           f"layer's forward (q/k/v, GQA-expanded k/v, MLP gate/up products: up to {window_mb:.1f} MB) and GPTQ's "
           f"Hessians of one layer ({hessians_mb:.1f} MB, held with the float layer: together less than the two "
           f"budgeted layers). Budget with the window intermediates: {budget + window_mb:.1f} MB -> "
           f"{'met' if growth <= budget + window_mb else 'missed'}.", ""]
    write_results("sequential_memory", rows, "\n".join(md), meta)
    print("\n".join(md))


if __name__ == "__main__":
    main()
