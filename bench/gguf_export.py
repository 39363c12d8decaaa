"""GGUF export on SmolLM2-135M: lowbit's Q4_0 / Q4_1 files against the gguf package's own quantization
of the same fp32 weights, and the memory of importing a GGUF file into lowbit's packed modules.

    nice -n 10 .venv/bin/python bench/gguf_export.py [--memory-only]

Every file is written by ``lowbit.io.gguf_export.export_gguf`` and evaluated by importing it back with
``lowbit.io.gguf_import.load_gguf`` (kernel="reference": the file's weights dequantized exactly, fp32
matmuls; llama.cpp itself is not installed), then ``evaluate(model, fp32, quick=True)``: perplexity at
context 512 on 2 windows of the licence text and 1 window of the held-out docs text, and the mean KL
to fp32 on the same tokens. In every file ``token_embd`` (also the tied output head) is Q8_0 from the
fp32 table, as in SmolLM2's own Q4_1 file; only the decoder linears differ between rows.

Peak memory: max RSS of a separate process that imports the libraries, then loads the model (the
libraries alone are measured too). Writes bench/results/gguf.md and .json.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# Run as a script, bench/ is sys.path[0], where a bench file named like a package (bench/hqq_bench.py) would
# shadow it (transformers probes `hqq`); import from the repository root instead.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._llm_common import RESULTS, CachedReference, machine, quiet, write_results  # noqa: E402
from lowbit.io.atomic import sha256_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import resource, sys, json
import torch, transformers, lowbit, gguf  # the libraries every variant needs
what = sys.argv[1]
if what == "gguf":
    from lowbit.io.gguf_import import load_gguf
    from lowbit.models.smollm2 import smollm2_gguf
    m = load_gguf(smollm2_gguf())
elif what == "gguf-notok":
    from lowbit.io.gguf_import import load_gguf
    from lowbit.models.smollm2 import smollm2_gguf
    m = load_gguf(smollm2_gguf(), tokenizer=False)
elif what == "fp32":
    from lowbit.models import load_model
    m = load_model("smollm2")
elif what == "hf-gguf":
    from transformers import AutoModelForCausalLM
    from lowbit.models.smollm2 import smollm2_gguf
    p = smollm2_gguf()
    m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
from lowbit.analysis.footprint import model_size_bytes
size = model_size_bytes(m) if what != "libs" else 0
peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if what != "libs":  # one forward touches every weight (memory-mapped safetensors pages count only once read)
    with torch.inference_mode():
        m(torch.tensor([[1, 2, 3, 4]])) if hasattr(m, "tokenizer") else m(input_ids=torch.tensor([[1, 2, 3, 4]]))
print(json.dumps({"what": what, "max_rss_mb": peak_load, "model_mb": size / 1e6,
                  "max_rss_forward_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_memory(what: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", CHILD, what], capture_output=True, text=True, env=env, cwd=ROOT,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


sha = sha256_file


def main() -> None:
    if "--merge-memory" in sys.argv:  # rewrite the tables from gguf.json and gguf_memory.json, measuring nothing
        old = json.loads((RESULTS / "gguf.json").read_text())
        write(old["rows"], json.loads((RESULTS / "gguf_memory.json").read_text()),
              {k: v for k, v in old["meta"].items() if k != "memory"})
        return
    if "--memory-only" in sys.argv:  # re-measure memory, keep the perplexity rows of the last run
        mem = {w: peak_memory(w) for w in ("libs", "gguf-notok", "gguf", "fp32", "hf-gguf")}
        (RESULTS / "gguf_memory.json").write_text(json.dumps(mem, indent=2))
        old = json.loads((RESULTS / "gguf.json").read_text())
        write(old["rows"], mem, {k: v for k, v in old["meta"].items() if k != "memory"})
        return
    quiet()
    import lowbit
    from lowbit.algorithms.awq import AWQConfig
    from lowbit.algorithms.gptq import GPTQConfig
    from lowbit.algorithms.rtn import WeightOnlyConfig
    from lowbit.analysis.evaluate import evaluate
    from lowbit.io.gguf_export import export_gguf
    from lowbit.io.gguf_import import load_gguf
    from lowbit.models import load_model
    from lowbit.models.smollm2 import smollm2_gguf

    meta = {"machine": machine(), "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    mem = {w: peak_memory(w) for w in ("libs", "gguf-notok", "gguf", "fp32", "hf-gguf")}
    print("memory", mem, flush=True)

    fp = load_model("smollm2")
    ref = CachedReference(fp)
    tok = fp.tokenizer
    src = smollm2_gguf()
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-gguf-bench-"))

    def measure(label: str, qtype: str, path: Path, how: str) -> dict:
        m = load_gguf(path, kernel="reference", tokenizer=False)
        m.tokenizer = tok  # the same tokenizer (the files carry SmolLM2's)
        r = evaluate(m, ref, quick=True)
        row = {"row": label, "type": qtype, "file_mb": path.stat().st_size / 1e6, "how": how, "sha256": sha(path)[:12],
               **{k: r[k] for k in ("ppl", "kl", "ppl_heldout", "kl_heldout")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(rows, mem, meta)
        return row

    def lowbit_file(label: str, qtype: str, config, calib=None) -> dict:
        model = lowbit.quantize(copy.deepcopy(fp), config, calib)
        path = tmp / f"{len(rows)}.gguf"
        rep = export_gguf(model, path, qtype, source_gguf=src, embedding_type="q8_0")
        lin = [t["how"] for n, t in rep.tensors.items() if n.startswith("blk.") and t["type"] == qtype]
        how = ", ".join(f"{lin.count(h)} {h}" for h in ("exact", "exact-codes", "requantized", "quantized") if h in lin)
        return measure(label, qtype, path, how)

    def reference_file(qtype: str) -> dict:
        path = tmp / f"ref-{qtype}.gguf"
        export_gguf(fp, path, qtype, source_gguf=src, embedding_type="q8_0")
        return measure(f"gguf reference quantize of fp32 (gguf.quants.quantize)", qtype, path, "210 quantized")

    base = evaluate(fp, ref, quick=True)
    rows.append({"row": "fp32 (transformers' dequantization of the Q4_1 file)", "type": "fp32",
                 **{k: base[k] for k in ("ppl", "kl", "ppl_heldout", "kl_heldout")}})
    head = ("lm.lm_head",)  # every file keeps the tied Q8_0 token_embd as its head
    reference_file("q4_0")
    lowbit_file("lowbit rtn on ggml's Q4_0 grid (--gguf q4_0)", "q4_0", WeightOnlyConfig(gguf="q4_0", exclude=head))
    lowbit_file("lowbit rtn w4 g32 sym (codes [-7, 7])", "q4_0", WeightOnlyConfig(bits=4, group_size=32, exclude=head))
    lowbit_file("lowbit gptq on the Q4_0 grid (--gguf q4_0)", "q4_0", GPTQConfig(bits=4, group_size=32, gguf="q4_0"))
    reference_file("q4_1")
    measure("SmolLM2's own Q4_1 file (imported as is)", "q4_1", src, "the source")
    lowbit_file("lowbit rtn on ggml's Q4_1 grid (--gguf q4_1)", "q4_1",
                WeightOnlyConfig(gguf="q4_1", bits=4, group_size=32, symmetric=False, exclude=head))
    lowbit_file("lowbit awq w4 g32 sym (codes [-7, 7])", "q4_0", AWQConfig(bits=4, group_size=32))
    lowbit_file("lowbit gptq w4 g32 affine", "q4_1", GPTQConfig(bits=4, group_size=32, symmetric=False))
    lowbit_file("lowbit gptq w4 g128 sym (requantized to Q4_0)", "q4_0", GPTQConfig(bits=4, group_size=128))
    meta["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    write(rows, mem, meta)
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()


def write(rows: list[dict], mem: dict, meta: dict) -> None:
    newer = RESULTS / "gguf_memory.json"  # from a --memory-only run (with the forward column)
    if newer.exists() and not all("max_rss_forward_mb" in v for v in mem.values()):
        mem = json.loads(newer.read_text())
    md = ["# GGUF export on SmolLM2-135M", "",
          "Perplexity @512 (quick: 2 windows of the licence text `ppl`, 1 window of the held-out docs text "
          "`ppl_heldout`) and mean KL to fp32, of each GGUF file imported back with `load_gguf` "
          "(reference kernel: the file's weights dequantized exactly). Decoder linears at the row's type; "
          "`token_embd` (= tied head) Q8_0 in every file. `how`: decoder linears written with lowbit's own "
          "codes (`exact`), codes kept with Q4_1's min rounded to fp16 (`exact-codes`), or dequantized and "
          "requantized by gguf's reference quantizer (`requantized`).", "",
          f"Load: {meta.get('uptime', '')} (perplexity does not depend on load).", "",
          "| file | type | MB | ppl | KL | ppl held-out | KL held-out | how | sha256 |",
          "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        mb = f"{r['file_mb']:.1f}" if "file_mb" in r else ""
        md.append(f"| {r['row']} | {r['type']} | {mb} | {r['ppl']:.4f} | {r['kl']:.4f} | {r['ppl_heldout']:.4f} | "
                  f"{r['kl_heldout']:.4f} | {r.get('how', '')} | {r.get('sha256', '')} |")
    md += ["", "Peak memory (max RSS of a separate process; `libs` = torch + transformers + lowbit + gguf imported):",
           "", "| process | max RSS MB after loading | after one 4-token forward | model MB |",
           "|---|---:|---:|---:|"]
    for w, label in (("libs", "libraries only"), ("gguf-notok", "load_gguf(SmolLM2 Q4_1 file, tokenizer=False)"),
                     ("gguf", "load_gguf(SmolLM2 Q4_1 file) with transformers' GGUF tokenizer"),
                     ("fp32", 'load_model("smollm2") (fp32, from its safetensors cache)'),
                     ("hf-gguf", "transformers from_pretrained(gguf_file=...) (dequantizes to fp32)")):
        if w in mem:
            fwd = mem[w].get("max_rss_forward_mb")
            md.append(f"| {label} | {mem[w]['max_rss_mb']:.0f} | {'' if fwd is None else f'{fwd:.0f}'} | "
                      f"{mem[w]['model_mb']:.1f} |")
    write_results("gguf", rows, "\n".join(md) + "\n", {**meta, "memory": mem})


if __name__ == "__main__":
    main()
