"""SmolLM2-135M decode speed: lowbit's decoder against HF generate and llama.cpp, in one run.

    nice -n 0 .venv/bin/python -P bench/decode.py [--rounds 3] [--new-tokens 128] [--quick]

Same prompt (the 14-token licence prompt), same number of new tokens, greedy, 2 threads for every
row, measured round-robin over ``--rounds`` rounds (best round counts: the machine is shared).
``decode tok/s`` = (new tokens - 1) / time after the first new token (prefill excluded, as
llama.cpp reports eval speed); ``prefill tok/s`` = a 128-token prompt / time to its first token.

Rows:
- fp32 and lowbit int4 g128 through Hugging Face ``generate`` (the path lowbit had);
- lowbit's :class:`lowbit.models.decode.Decoder` on int4 g128 symmetric (GPTQ-ready grid, off the
  Q4_1 grid SmolLM2 came from) and on the Q4_0 grid (``rtn --gguf q4_0``), each with the tied
  embedding/head quantized at the same type and stored once (``--tie-embeddings``), with fp32
  activations (exact weight-only math) and with int8 activations per block of 32 (W4A8, as
  llama.cpp computes Q4 products);
- llama.cpp (``llama-cpp-python``, optional: ``pip install llama-cpp-python``, ~9 min compile) on
  the Q4_0 file lowbit exports from the very same Q4_0 model (``token_embd`` Q4_0 too: the same
  weights as the lowbit Q4_0 rows), on SmolLM2's own Q4_1 file, and on a Q8_0 export.

Perplexity (2 windows of 512 tokens of the licence text, the decoder's own logits) is given for the
lowbit rows; llama.cpp's Q4_0 row holds the same weights as lowbit's Q4_0 rows.

Roofline: memory read bandwidth measured here (``torch.sum`` over 512 MB, 2 threads), the bytes a
token must read (weights in the kernels' layout + the KV cache), the tokens/s ceiling they imply
and the share of it reached. Writes ``bench/results/decode.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._llm_common import machine, quiet, read_bandwidth_gbs, write_results  # noqa: E402

PROMPT = "The licence grants permission to use, copy and modify the software provided that"
THREADS = 2

MEMORY_CHILD = """
import ctypes, gc, json, sys
import torch, transformers, lowbit
def status():
    d = {}
    for line in open('/proc/self/status'):
        if line.startswith(('VmRSS', 'VmHWM')):
            d[line.split(':')[0]] = int(line.split()[1]) / 1024
    return d
libs = status()
from lowbit.models.decode import Decoder
m = lowbit.load(sys.argv[1])
ids = m.tokenizer('The licence grants permission to use', return_tensors='pt').input_ids
d = Decoder(m, max_len=256, activations=sys.argv[2])
del m
gc.collect()
ctypes.CDLL('libc.so.6').malloc_trim(0)
d.generate(ids, 32)
print(json.dumps({'libs': libs, 'decoding': status(), 'layout_mb': d.nbytes() / 1e6}))
"""


def decoder_memory(folder: Path, activations: str) -> dict:
    """RSS of a fresh process that loads the saved folder, builds the decoder, frees the model and
    decodes 32 tokens: libraries alone, then while decoding (VmRSS) and its peak (VmHWM), in MB."""
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(folder), activations], capture_output=True,
                         text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    return json.loads(out.strip().splitlines()[-1])


def hf_decode(model, ids, new_tokens: int) -> tuple[float, float]:
    """(decode tok/s, seconds to the first token) for HF generate: 1 token and n tokens timed apart."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.lm.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t1 = time.perf_counter()
        model.lm.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        t2 = time.perf_counter()
    return (new_tokens - 1) / max(1e-9, (t2 - t1) - (t1 - t0)), t1 - t0


def lowbit_decode(decoder, ids, new_tokens: int) -> tuple[float, float]:
    r = decoder.timed_generate(ids, new_tokens)
    return r["decode_tps"], r["prefill_s"]


def llama_decode(llm, tokens: list[int], new_tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    n, first = 0, None
    for _ in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, reset=True):
        n += 1
        if first is None:
            first = time.perf_counter()
        if n == new_tokens:
            break
    end = time.perf_counter()
    return (n - 1) / (end - first), first - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="1 round, 32 tokens, no perplexity")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens = 1, 32
    quiet()
    torch.set_num_threads(THREADS)
    import lowbit
    from lowbit.algorithms.rtn import WeightOnlyConfig
    from lowbit.analysis.evaluate import lm_scores, lm_windows
    from lowbit.analysis.footprint import model_size_bytes
    from lowbit.data import lm_eval_text
    from lowbit.io.gguf_export import export_gguf
    from lowbit.models import load_model
    from lowbit.models.decode import Decoder
    from lowbit.models.smollm2 import smollm2_gguf

    meta = {"machine": machine(), "load_start": os.getloadavg()[0], "threads": THREADS,
            "new_tokens": args.new_tokens, "rounds": args.rounds}
    bw = read_bandwidth_gbs()
    meta["read_bandwidth_gbs"] = bw
    fp = load_model("smollm2")
    tok = fp.tokenizer
    ids = tok(PROMPT, return_tensors="pt").input_ids
    long_ids = tok(" ".join([PROMPT] * 12), return_tensors="pt").input_ids[:, :128]
    windows = lm_windows(tok, lm_eval_text(), 512, max_windows=2)

    g128 = lowbit.quantize(copy.deepcopy(fp), WeightOnlyConfig(bits=4, group_size=128, tie_embeddings=True))
    q4_0 = lowbit.quantize(copy.deepcopy(fp), WeightOnlyConfig(gguf="q4_0", tie_embeddings=True))
    hf_int4 = lowbit.quantize(copy.deepcopy(fp), WeightOnlyConfig(bits=4, group_size=128))

    rows: dict[str, dict] = {}
    runners = {}

    def add(name: str, model, run, decoder=None, bytes_per_token=None, what=""):
        rows[name] = {"row": name, "what": what, "model_mb": model_size_bytes(model) / 1e6, "decode_tps": 0.0,
                      "prefill_tps": 0.0, "bytes_per_token_mb": None if bytes_per_token is None else bytes_per_token / 1e6}
        runners[name] = run
        if decoder is not None and not args.quick:
            r = lm_scores(decoder.logits, None, windows)
            rows[name]["ppl"] = r["ppl"]

    add("fp32, HF generate", fp, lambda i, n: hf_decode(fp, i, n), bytes_per_token=model_size_bytes(fp),
        what="transformers, fp32")
    add("lowbit int4 g128 sym, HF generate", hf_int4, lambda i, n: hf_decode(hf_int4, i, n),
        bytes_per_token=model_size_bytes(hf_int4), what="int4pack kernel (bf16 activations), fp32 tied head")
    kv_bytes = lambda d, n: 2 * len(d.layers) * d.n_kv * d.head_dim * 4 * (ids.shape[1] + n // 2)  # mean cache read
    for label, model in (("int4 g128 sym", g128), ("Q4_0 grid", q4_0)):
        for act in ("fp32", "int8"):
            d = Decoder(model, max_len=1024, activations=act)
            add(f"lowbit decoder, {label}, {act} activations", model, (lambda dd: lambda i, n: lowbit_decode(dd, i, n))(d),
                decoder=d, bytes_per_token=d.nbytes() + kv_bytes(d, args.new_tokens),
                what="block GEMV kernels, tied 4-bit head")

    llama_error = None
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-decode-bench-"))
    lowbit.save(g128, tmp / "int4-g128")
    meta["memory"] = decoder_memory(tmp / "int4-g128", "int8")
    meta["memory"]["disk_mb"] = sum(f.stat().st_size for f in (tmp / "int4-g128").iterdir()) / 1e6
    try:
        from llama_cpp import Llama

        files = {"Q4_0 (lowbit's export of the Q4_0 rows' model)": tmp / "q4_0.gguf",
                 "Q4_1 (SmolLM2's own file)": smollm2_gguf(), "Q8_0 (lowbit export of fp32)": tmp / "q8_0.gguf"}
        export_gguf(q4_0, files["Q4_0 (lowbit's export of the Q4_0 rows' model)"], "q4_0", source_gguf=smollm2_gguf(),
                    embedding_type="q4_0")
        export_gguf(fp, files["Q8_0 (lowbit export of fp32)"], "q8_0", source_gguf=smollm2_gguf(), embedding_type="q8_0")
        for label, path in files.items():
            llm = Llama(model_path=str(path), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=1024, verbose=False)
            tokens = llm.tokenize(PROMPT.encode(), add_bos=False)
            name = f"llama.cpp {label}"
            rows[name] = {"row": name, "what": "llama-cpp-python", "model_mb": path.stat().st_size / 1e6,
                          "decode_tps": 0.0, "prefill_tps": 0.0, "bytes_per_token_mb": path.stat().st_size / 1e6}
            runners[name] = (lambda ll: lambda i, n: llama_decode(ll, i.tolist()[0], n))(llm)
    except ImportError as exc:
        llama_error = f"llama-cpp-python not installed ({exc}); llama.cpp rows omitted"
    meta["llama_cpp"] = llama_error or "llama-cpp-python " + __import__("llama_cpp").__version__

    for name, run in runners.items():  # warm-up: kernel builds, allocator, llama.cpp's graph
        run(ids, 4)
    for rnd in range(args.rounds):
        for name, run in runners.items():
            tps, _ = run(ids, args.new_tokens)
            _, first = run(long_ids, 2)
            rows[name]["decode_tps"] = max(rows[name]["decode_tps"], tps)
            rows[name]["prefill_tps"] = max(rows[name]["prefill_tps"], long_ids.shape[1] / first)
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{r['row']} {r['decode_tps']:.1f}" for r in rows.values()),
              flush=True)
    meta["load_end"] = os.getloadavg()[0]
    out = list(rows.values())
    ref_name = next((n for n in rows if n.startswith("llama.cpp Q4_0")), None)
    for r in out:
        r["x_fp32"] = r["decode_tps"] / rows["fp32, HF generate"]["decode_tps"]
        r["x_llama_q4_0"] = r["decode_tps"] / rows[ref_name]["decode_tps"] if ref_name else None
        r["prefill_x_fp32"] = r["prefill_tps"] / rows["fp32, HF generate"]["prefill_tps"]
        if r["bytes_per_token_mb"]:
            r["ceiling_tps"] = bw * 1e3 / r["bytes_per_token_mb"]
            r["roofline_share"] = r["decode_tps"] / r["ceiling_tps"]
    md = [
        "# SmolLM2-135M decode: lowbit's decoder vs HF generate vs llama.cpp", "",
        f"Greedy, prompt of {ids.shape[1]} tokens, {args.new_tokens} new tokens, {THREADS} threads, best of "
        f"{args.rounds} round-robin rounds; prefill = a 128-token prompt. 1-min load average {meta['load_start']:.2f} "
        f"at the start, {meta['load_end']:.2f} at the end. {meta['machine'].get('cpu', '')}. "
        f"{meta['llama_cpp']}. Command: `python -P bench/decode.py`.", "",
        f"**Roofline**: read bandwidth {bw:.1f} GB/s (torch.sum over 512 MB, {THREADS} threads); ceiling = bandwidth / "
        "bytes read per token (weights in the kernel layout + mean KV cache; for llama.cpp the file size).", "",
        "| row | model MB | ppl (licence, 2x512) | decode tok/s | × fp32 | × llama.cpp Q4_0 | prefill tok/s | "
        "MB read/token | ceiling tok/s | share of ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out:
        f = lambda v, spec: "" if v is None else format(v, spec)
        md.append(f"| {r['row']} | {r['model_mb']:.1f} | {f(r.get('ppl'), '.3f')} | {r['decode_tps']:.1f} | "
                  f"{r['x_fp32']:.2f} | {f(r['x_llama_q4_0'], '.2f')} | {r['prefill_tps']:.0f} | "
                  f"{f(r['bytes_per_token_mb'], '.1f')} | {f(r.get('ceiling_tps'), '.0f')} | "
                  f"{f(r.get('roofline_share'), '.0%')} |")
    mem = meta["memory"]
    md += ["", f"**Memory** (int4 g128 tied, saved folder {mem['disk_mb']:.1f} MB on disk): a fresh process that loads "
           f"it, builds the decoder (kernel layouts {mem['layout_mb']:.1f} MB), frees the model and decodes 32 tokens "
           f"holds {mem['decoding']['VmRSS']:.0f} MB RSS (peak {mem['decoding']['VmHWM']:.0f} MB), of which "
           f"{mem['libs']['VmRSS']:.0f} MB is torch + transformers + lowbit imported before loading."]
    write_results("decode", out, "\n".join(md) + "\n", meta)
    import shutil

    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
