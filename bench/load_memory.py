"""Peak memory of ``lowbit.load`` of a quantized SmolLM2 vs building the fp32 model -> bench/results/load_memory.md.

    python -P bench/load_memory.py

Quantizes SmolLM2 once (RTN int4 g128 symmetric, decoder linears; the tied embedding/head stays
fp32), saves it, then measures in separate fresh processes the peak resident set (``VmHWM``) of:
the imports alone (baseline), ``load_model("smollm2")`` (the fp32 model), and ``lowbit.load(DIR)``
(the architecture on ``meta``, tensors assigned from the file), each followed by one 8-token forward
so that every weight is really resident. Growth = peak - baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import resource, sys, json
import torch, transformers, lowbit, safetensors  # what every variant imports
from lowbit.models import load_model
what, folder, forward = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if what == "fp32":
    m = load_model("smollm2")
elif what == "lowbit.load":
    m = lowbit.load(folder)
if what != "baseline" and forward:  # one forward touches every weight (mmapped pages count only once read)
    with torch.inference_mode():
        m(torch.arange(8)[None] + 100)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))  # kB, this mm only
print(json.dumps({"max_rss_mb": hwm / 1024}))
"""


def peak(what: str, folder: str, forward: bool = False) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, what, folder, str(int(forward))], capture_output=True, text=True, env=env,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])["max_rss_mb"]


def main() -> None:
    import lowbit
    from lowbit.algorithms.rtn import WeightOnlyConfig
    from lowbit.io.atomic import atomic_write_text
    from lowbit.models import load_model

    tmp = Path(tempfile.mkdtemp(prefix="lowbit-load-"))
    folder = tmp / "smollm2-int4"
    m = load_model("smollm2")
    lowbit.quantize(m, WeightOnlyConfig(bits=4, group_size=128, symmetric=True, exclude=("lm.lm_head",)))
    meta = lowbit.save(m, folder)
    del m
    disk = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    base = peak("baseline", str(folder))
    fp32, fp32_f = peak("fp32", str(folder)), peak("fp32", str(folder), True)
    q, q_f = peak("lowbit.load", str(folder)), peak("lowbit.load", str(folder), True)
    size = meta.sizes["size_bytes"] / 1e6
    lines = [
        "# Peak memory of loading a quantized SmolLM2",
        "",
        "`python -P bench/load_memory.py`: fresh processes, peak resident set (`VmHWM`: `ru_maxrss` carries the parent's peak across exec); growth over a",
        "process that only imports torch, transformers and lowbit; \"+ forward\" adds one 8-token forward, which",
        "makes every mmapped weight resident and builds the fast kernels' layouts. The quantized model is RTN int4 g128",
        "symmetric on the decoder linears (the tied 28M-parameter embedding/head stays fp32: 113 MB of it).",
        "",
        "| what | peak RSS MB | growth over imports MB |",
        "|---|---|---|",
        f"| imports only | {base:.0f} | 0 |",
        f"| `load_model(\"smollm2\")` (fp32) | {fp32:.0f} | {fp32 - base:.0f} |",
        f"| `load_model(\"smollm2\")` (fp32) + forward | {fp32_f:.0f} | {fp32_f - base:.0f} |",
        f"| `lowbit.load(DIR)` (int4 folder) | {q:.0f} | {q - base:.0f} |",
        f"| `lowbit.load(DIR)` (int4 folder) + forward | {q_f:.0f} | {q_f - base:.0f} |",
        "",
        f"Quantized model size (tensors): {size:.1f} MB; folder on disk {disk:.1f} MB (weights, config, tokenizer,",
        "metadata). Before this change `lowbit.load` built the fp32 model first (the fp32 row) and then",
        "swapped the quantized layers in.",
        "",
    ]
    atomic_write_text(ROOT / "bench" / "results" / "load_memory.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
