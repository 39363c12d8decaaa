"""GGUF export on SmolLM2-135M: lowbit's Q4_0 / Q4_1 files against llama.cpp's own quantization of the
same fp32 weights (the gguf package's reference quantizer, ``gguf.quants.quantize``), perplexity measured
INSIDE llama.cpp and in lowbit, and the memory of importing a GGUF file into lowbit's packed modules.

    flock /tmp/lowbit-heavy.lock nice -n 10 .venv/bin/python bench/gguf_export.py [--part abcdef]
    .venv/bin/python bench/gguf_export.py --memory-only | --merge-memory

Every file is written by ``lowbit.io.gguf_export.export_gguf`` and evaluated twice on the same token ids
(lowbit's tokenizer, ``lm_windows`` at context 512: 2 windows of the licence text, 1 window of the held-out
docs text, as ``evaluate(quick=True)``):

- in llama.cpp (``llama-cpp-python``, an optional bench peer imported only here; its columns stay empty
  when it is missing): ``Llama(n_ctx=512, logits_all=True)``, each window evaluated from an empty cache,
  mean NLL computed by :func:`llama_cpp_scores` from the returned logits; also llama.cpp's prefill and
  greedy decode tokens/s (2 threads);
- in lowbit: imported back with ``lowbit.io.gguf_import.load_gguf`` (kernel="reference": the file's
  weights dequantized exactly, fp32 matmuls), then ``evaluate(model, fp32, quick=True)`` (ppl and mean KL
  to fp32).

In every file ``token_embd`` (also the tied output head) is Q8_0 from the fp32 table, as in SmolLM2's own
Q4_1 file; only the decoder linears differ between rows. Parts (``--part``, one locked run each; the
default runs all and re-measures memory): a = fp32, llama.cpp's Q4_0, lowbit rtn / GPTQ on the Q4_0 grid;
b = AWQ and AWQ+GPTQ on the Q4_0 grid (``AWQConfig(gguf="q4_0")``, rounding rtn / gptq); c = Q4_1 (llama.cpp's, SmolLM2's
own file, rtn on the Q4_1 grid, GPTQ affine); d, e = files off ggml's rounding (codes [-7, 7], g128); f = W4 g128
affine files written as Q4_1 with their codes (AWQ with HQQ's rounding, ``awq-hqq``, whose fp16 zero-points become
Q4_1's min, against RTN at the same grid); g = ``--scheme gptq`` / ``awq-gptq --gguf q4_0`` exactly as the CLI builds
them (``lowbit.config.build_config``: the schemes' attention-mixed v_proj Hessian and, for gptq, residual token
weights; parts a / b are the library configs' defaults, the plain Hessian).
Each part writes bench/results/gguf_part_<p>.json; every write merges the part files present into
bench/results/gguf.md and .json.

Peak memory: max RSS of a separate process that imports the libraries, then loads the model (the
libraries alone are measured too).
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
PARTS = "abcdefg"  # a: Q4_0 rtn/gptq; b: Q4_0 awq/awq-gptq; c: Q4_1; d, e: off-grid files (codes [-7, 7], requantized);
# f: HQQ's fp16 zero-points as Q4_1's min (awq-hqq, hqq at g128: exact codes); g: gptq / awq-gptq --gguf q4_0 with
# the schemes' defaults (a / b build GPTQConfig / AWQConfig, whose options default off)
LLAMA_THREADS = 2
DECODE_TOKENS = 64


def llama_cpp_scores(path: Path, windows: dict[str, torch.Tensor]) -> dict:
    """Perplexity of the GGUF file at ``path`` computed inside llama.cpp (llama-cpp-python), on the same
    token windows lowbit's evaluation uses; prefill and decode tokens/s of llama.cpp on this machine.

    Each window (T = 512 ids, no BOS added) is evaluated from an empty KV cache with ``logits_all``; the
    NLL is ``-log_softmax(logits[t])[ids[t + 1]]`` summed over t < T - 1, and ``ppl = exp(sum NLL / count)``
    per text, exactly ``lowbit.analysis.evaluate.lm_scores``'s formula. Decode: greedy, DECODE_TOKENS
    single-token evals after the first 16 ids of the first window. Returns ``{}`` when llama_cpp is missing.
    """
    try:
        from llama_cpp import Llama
    except ImportError:
        return {}
    import time

    import numpy as np

    ctx = max(w.shape[1] for w in windows.values())
    llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                n_threads=LLAMA_THREADS, n_threads_batch=LLAMA_THREADS, verbose=False)
    out, prefill = {}, []
    for key, ws in windows.items():
        nll, count = 0.0, 0
        for window in ws:
            ids = window.tolist()
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            prefill.append(time.perf_counter() - t0)
            logits = torch.from_numpy(np.array(llm.scores[: len(ids) - 1], dtype=np.float32))  # (T-1, V)
            logp = torch.log_softmax(logits.double(), dim=-1)
            nll += float(-logp.gather(1, window[1:, None]).sum())
            count += len(ids) - 1
        out[key] = float(np.exp(nll / count))
    llm.reset()
    prompt = windows["ppl"][0][:16].tolist()
    llm.eval(prompt)
    t0 = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode = DECODE_TOKENS / (time.perf_counter() - t0)
    timed = sorted(prefill[1:] or prefill)
    out.update({"llama_prefill_tps": ctx / timed[len(timed) // 2], "llama_decode_tps": decode})
    del llm
    return {"llama_ppl": out["ppl"], "llama_ppl_heldout": out["ppl_heldout"],
            "llama_prefill_tps": out["llama_prefill_tps"], "llama_decode_tps": out["llama_decode_tps"]}


def main() -> None:
    if "--merge-memory" in sys.argv:  # rewrite the tables from the part files and gguf_memory.json, measuring nothing
        write(json.loads((RESULTS / "gguf_memory.json").read_text()))
        return
    if "--memory-only" in sys.argv:  # re-measure memory, keep the perplexity rows of the last runs
        mem = {w: peak_memory(w) for w in ("libs", "gguf-notok", "gguf", "fp32", "hf-gguf")}
        (RESULTS / "gguf_memory.json").write_text(json.dumps(mem, indent=2))
        write(mem)
        return
    parts = PARTS
    if "--part" in sys.argv:
        parts = sys.argv[sys.argv.index("--part") + 1]
        if not set(parts) <= set(PARTS):
            raise SystemExit(f"--part takes letters of {PARTS!r}, got {parts!r}")
    quiet()
    import lowbit
    from lowbit.algorithms.awq import AWQConfig
    from lowbit.algorithms.gptq import GPTQConfig
    from lowbit.algorithms.rtn import WeightOnlyConfig
    from lowbit.analysis.evaluate import evaluate, lm_context, lm_windows
    from lowbit.data import lm_calib_composition, lm_eval_text, lm_heldout_text
    from lowbit.io.gguf_export import export_gguf
    from lowbit.io.gguf_import import load_gguf
    from lowbit.models import load_model
    from lowbit.models.smollm2 import smollm2_gguf

    if parts == PARTS:  # the whole run re-measures memory too
        mem = {w: peak_memory(w) for w in ("libs", "gguf-notok", "gguf", "fp32", "hf-gguf")}
        (RESULTS / "gguf_memory.json").write_text(json.dumps(mem, indent=2))
    mem = json.loads((RESULTS / "gguf_memory.json").read_text())

    fp = load_model("smollm2")
    ref = CachedReference(fp)
    tok = fp.tokenizer
    ctx = lm_context(fp)
    windows = {"ppl": lm_windows(tok, lm_eval_text(), ctx, max_windows=2),  # evaluate(quick=True)'s windows
               "ppl_heldout": lm_windows(tok, lm_heldout_text(), ctx, max_windows=1)}
    src = smollm2_gguf()
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-gguf-bench-"))
    head = ("lm.lm_head",)  # every file keeps the tied Q8_0 token_embd as its head

    for part in parts:
        rows: list[dict] = []
        meta = {"machine": machine(), "part": part, "command": f"flock /tmp/lowbit-heavy.lock nice -n 10 "
                f".venv/bin/python bench/gguf_export.py --part {part}",
                "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
                "mix": lm_calib_composition()["sha256"][:12]}

        def save():
            write_part(part, rows, meta)
            write(mem)

        def measure(label: str, qtype: str, path: Path, how: str, seconds: float | None = None) -> dict:
            m = load_gguf(path, kernel="reference", tokenizer=False)
            m.tokenizer = tok  # the same tokenizer (the files carry SmolLM2's)
            r = evaluate(m, ref, quick=True)
            del m
            row = {"row": label, "type": qtype, "file_mb": path.stat().st_size / 1e6, "how": how,
                   "sha256": sha(path)[:12], **{k: r[k] for k in ("ppl", "kl", "ppl_heldout", "kl_heldout")},
                   **llama_cpp_scores(path, windows)}
            if seconds is not None:
                row["quantize_s"] = seconds
            rows.append(row)
            print(json.dumps(row), flush=True)
            save()
            return row

        def lowbit_file(label: str, qtype: str, config, calib=None) -> dict:
            import time

            t0 = time.perf_counter()
            model = lowbit.quantize(copy.deepcopy(fp), config, calib)
            seconds = time.perf_counter() - t0
            path = tmp / f"{part}{len(rows)}.gguf"
            rep = export_gguf(model, path, qtype, source_gguf=src, embedding_type="q8_0")
            del model
            lin = [t["how"] for n, t in rep.tensors.items() if n.startswith("blk.") and t["type"] == qtype]
            how = ", ".join(f"{lin.count(h)} {h}" for h in ("exact", "exact-codes", "requantized", "quantized")
                            if h in lin)
            out = measure(label, qtype, path, how, seconds)
            path.unlink()
            return out

        def reference_file(qtype: str) -> dict:
            path = tmp / f"ref-{qtype}.gguf"
            export_gguf(fp, path, qtype, source_gguf=src, embedding_type="q8_0")
            out = measure("llama.cpp's own: gguf.quants.quantize of fp32", qtype, path, "210 quantized")
            path.unlink()
            return out

        if part == "a":
            base = evaluate(fp, ref, quick=True)
            rows.append({"row": "fp32 (transformers' dequantization of the Q4_1 file)", "type": "fp32",
                         **{k: base[k] for k in ("ppl", "kl", "ppl_heldout", "kl_heldout")}})
            reference_file("q4_0")
            lowbit_file("lowbit rtn on the Q4_0 grid (--scheme rtn --gguf q4_0)", "q4_0",
                        WeightOnlyConfig(gguf="q4_0", exclude=head))
            lowbit_file("lowbit gptq on the Q4_0 grid (GPTQConfig(gguf='q4_0'): plain Hessian, plain tokens; = --scheme gptq --gguf q4_0 --plain-hessian --plain-tokens)", "q4_0",
                        GPTQConfig(bits=4, group_size=32, gguf="q4_0"))
        elif part == "b":
            lowbit_file("lowbit awq on the Q4_0 grid (--scheme awq --gguf q4_0)", "q4_0",
                        AWQConfig(bits=4, group_size=32, gguf="q4_0"))
            lowbit_file("lowbit awq-gptq on the Q4_0 grid (AWQConfig(gguf='q4_0', rounding='gptq'): plain Hessian; = --scheme awq-gptq --gguf q4_0 --plain-hessian)", "q4_0",
                        AWQConfig(bits=4, group_size=32, gguf="q4_0", rounding="gptq"))
        elif part == "c":
            reference_file("q4_1")
            measure("SmolLM2's own Q4_1 file (imported as is)", "q4_1", src, "the source")
            lowbit_file("lowbit rtn on the Q4_1 grid (--scheme rtn --gguf q4_1)", "q4_1",
                        WeightOnlyConfig(gguf="q4_1", bits=4, group_size=32, symmetric=False, exclude=head))
            lowbit_file("lowbit gptq w4 g32 affine (int zero-point -> Q4_1 min)", "q4_1",
                        GPTQConfig(bits=4, group_size=32, symmetric=False))
        elif part == "d":
            lowbit_file("lowbit rtn w4 g32 sym (codes [-7, 7])", "q4_0",
                        WeightOnlyConfig(bits=4, group_size=32, exclude=head))
            lowbit_file("lowbit gptq w4 g128 sym (each g128 scale repeated over its Q4_0 blocks)", "q4_0", GPTQConfig(bits=4, group_size=128))
        elif part == "e":
            lowbit_file("lowbit awq w4 g32 sym (codes [-7, 7])", "q4_0", AWQConfig(bits=4, group_size=32))
        elif part == "f":
            lowbit_file("lowbit awq-hqq w4 g128 affine (fp16 zero-point -> Q4_1 min)", "q4_1",
                        AWQConfig(bits=4, group_size=128, symmetric=False, init="hqq"))
            lowbit_file("lowbit rtn w4 g128 affine (int zero-point -> Q4_1 min)", "q4_1",
                        WeightOnlyConfig(bits=4, group_size=128, symmetric=False, exclude=head))
        elif part == "g":  # parts a / b's calibrated rows as the CLI builds them today (the scheme defaults)
            from lowbit.config import build_config

            for scheme in ("gptq", "awq-gptq"):
                cfg = build_config(scheme, {"gguf": "q4_0"})
                lowbit_file(f"lowbit {scheme} on the Q4_0 grid, the scheme's defaults (--scheme {scheme} --gguf q4_0; "
                            f"attention_hessian={cfg.attention_hessian}, residual_weights={cfg.residual_weights})",
                            "q4_0", cfg)
        meta["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        save()
    tmp.rmdir()


def write_part(part: str, rows: list[dict], meta: dict) -> None:
    (RESULTS / f"gguf_part_{part}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def target_lines(rows: list[dict]) -> list[str]:
    """Per type and text: each lowbit file's llama.cpp perplexity against llama.cpp's own quantization."""
    out = []
    for qtype in ("q4_0", "q4_1"):
        own = next((r for r in rows if r["type"] == qtype and r["row"].startswith("llama.cpp's own")), None)
        if own is None or "llama_ppl" not in own:
            continue
        for r in rows:
            if r["type"] != qtype or not r["row"].startswith("lowbit") or "llama_ppl" not in r:
                continue
            verdicts = []
            for key, text in (("llama_ppl", "licence"), ("llama_ppl_heldout", "held-out")):
                d = r[key] / own[key] - 1
                word = ("the same file" if r.get("sha256") == own.get("sha256") else
                        "lower: met" if r[key] < own[key] else "NOT lower: missed")
                verdicts.append(f"{text} {r[key]:.3f} vs {own[key]:.3f} ({100 * d:+.2f}%, {word})")
            out.append(f"- {qtype.upper()} {r['row']}: " + "; ".join(verdicts))
    return out


def write(mem: dict) -> None:
    rows, metas = [], []
    for part in PARTS:
        f = RESULTS / f"gguf_part_{part}.json"
        if f.exists():
            d = json.loads(f.read_text())
            rows += d["rows"]
            metas.append(d["meta"])
    md = ["# GGUF export on SmolLM2-135M: perplexity inside llama.cpp and in lowbit", "",
          "Perplexity @512 on the same token ids in both runtimes (lowbit's tokenizer, `lm_windows`: 2 windows "
          "of the licence text `ppl`, 1 window of the held-out docs text `ppl_heldout`, as `evaluate(quick=True)`). "
          "`llama.cpp` columns: the file run by llama.cpp (llama-cpp-python 0.3.36, CPU, 2 threads, n_ctx 512, "
          "`logits_all`, mean NLL computed from its logits by the bench); `lowbit` columns: the same file "
          "imported back with `load_gguf` (reference kernel: the file's weights dequantized exactly, fp32 "
          "matmuls), KL = mean next-token KL to fp32 there. `gap` = llama.cpp ppl / lowbit ppl - 1 (licence, "
          "held-out): the two runtimes' arithmetic differs (llama.cpp quantizes activations to Q8_0 for its Q4 dot "
          "products), the weights are the same. Decoder linears at the row's type; `token_embd` (= tied head) "
          "Q8_0 in every file. `how`: decoder linears written with lowbit's own codes (`exact`), codes kept with "
          "Q4_1's min rounded to fp16 (`exact-codes`), or requantized / quantized by gguf's reference quantizer. "
          "Decode tok/s: llama.cpp, greedy, 64 tokens after a 16-token prompt, 2 threads (shared machine: "
          "indicative, the same by construction for every file of one type).", "",
          "SmolLM2-135M's published weights came from a Q4_1 file (4-bit, blocks of 32, asymmetric), so Q4_1 at "
          "blocks of 32 reproduces them almost exactly (gguf's Q4_1 quantization of fp32 = the fp32 row) and "
          "there is nothing left for a better method to win: **the headline comparison is Q4_0** (symmetric), "
          "where every file loses information.", "",
          "| file | type | MB | llama.cpp ppl | llama.cpp ppl held-out | lowbit ppl | lowbit ppl held-out | gap | "
          "KL | KL held-out | prefill tok/s | decode tok/s | quantize s | how | sha256 |",
          "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        gap = (f"{100 * (r['llama_ppl'] / r['ppl'] - 1):+.2f}% / {100 * (r['llama_ppl_heldout'] / r['ppl_heldout'] - 1):+.2f}%"
               if "llama_ppl" in r else "")
        md.append(f"| {r['row']} | {r['type']} | {_fmt(r.get('file_mb'), '.1f')} | {_fmt(r.get('llama_ppl'), '.4f')} | "
                  f"{_fmt(r.get('llama_ppl_heldout'), '.4f')} | {r['ppl']:.4f} | {r['ppl_heldout']:.4f} | {gap} | "
                  f"{r['kl']:.4f} | {r['kl_heldout']:.4f} | {_fmt(r.get('llama_prefill_tps'), '.0f')} | "
                  f"{_fmt(r.get('llama_decode_tps'), '.0f')} | {_fmt(r.get('quantize_s'), '.0f')} | "
                  f"{r.get('how', '')} | {r.get('sha256', '')} |")
    verdict = target_lines(rows)
    if verdict:
        md += ["", "Target (issue 15: lowbit's file has the lower llama.cpp perplexity at the same type, on both "
               "texts):", ""] + verdict
    md += ["", "Runs (one per part; perplexity does not depend on load, the tok/s columns do):", ""]
    for meta in metas:
        md.append(f"- part {meta['part']}: `{meta['command']}`; calibration mix `{meta.get('mix', '?')}`; "
                  f"uptime at start `{meta['uptime']}`"
                  + (f"; at end `{meta['uptime_end']}`" if "uptime_end" in meta else " (run did not finish)"))
    md += ["", "Peak memory (max RSS of a separate process; `libs` = torch + transformers + lowbit + gguf imported):",
           "", "| process | max RSS MB after loading | after one four-token forward | model MB |",
           "|---|---:|---:|---:|"]
    for w, label in (("libs", "libraries only"), ("gguf-notok", "load_gguf(SmolLM2 Q4_1 file, tokenizer=False)"),
                     ("gguf", "load_gguf(SmolLM2 Q4_1 file) with transformers' GGUF tokenizer"),
                     ("fp32", 'load_model("smollm2") (fp32, from its safetensors cache)'),
                     ("hf-gguf", "transformers from_pretrained(gguf_file=...) (dequantizes to fp32)")):
        if w in mem:
            fwd = mem[w].get("max_rss_forward_mb")
            md.append(f"| {label} | {mem[w]['max_rss_mb']:.0f} | {'' if fwd is None else f'{fwd:.0f}'} | "
                      f"{mem[w]['model_mb']:.1f} |")
    write_results("gguf", rows, "\n".join(md) + "\n", {"parts": metas, "memory": mem})


if __name__ == "__main__":
    main()
