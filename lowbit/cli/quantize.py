"""``lowbit quantize``: quantize a real model with a named scheme, measure it against fp32, save it.

Every flag of every scheme is declared here once; each scheme says which it accepts (see
``lowbit.config.register_scheme``) and refuses the others with a clear message.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from lowbit.cli._common import clean_errors, step


def _print_schemes() -> None:
    from rich.console import Console
    from rich.table import Table

    from lowbit.config import list_schemes

    t = Table(title="lowbit schemes")
    t.add_column("scheme")
    t.add_column("options")
    t.add_column("what it does")
    for s in list_schemes():
        t.add_row(s.name, " ".join("--" + o.replace("_", "-") for o in s.options), s.help)
    Console().print(t)


def _fmt(v, digits=4):
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return "" if v is None else str(v)


def print_comparison(rows: list[dict]) -> None:
    """A rich table of evaluate() results, one row per model variant, with ratios to the first row."""
    from rich.console import Console
    from rich.table import Table

    base = rows[0]
    keys = [k for k in ("cos_mean", "cos_min", "top10_agreement", "ppl", "kl", "ppl_heldout", "kl_heldout",
                        "ppl_science", "kl_science", "accuracy")
            if k in base or k in rows[-1]]
    speed = [k for k in ("sps_b1", "sps_b32", "prefill_tps", "decode_tps", "sps") if k in base]
    t = Table(title=f"{base.get('model')}: measured on this machine")
    for col in ["scheme", "size MB", "bits/weight", *keys, *speed, *[f"{k} ×fp32" for k in speed[-1:]]]:
        t.add_column(col, justify="right")
    for r in rows:
        ratio = [(_fmt(r[speed[-1]] / base[speed[-1]], 2) + "×") if speed else ""]
        t.add_row(r.get("scheme", ""), _fmt(r["size_bytes"] / 1e6, 2), _fmt(r["bits_per_weight"], 2),
                  *[_fmt(r.get(k), 5) for k in keys], *[_fmt(r.get(k), 1) for k in speed], *ratio[: len(speed[-1:])])
    Console(width=None if sys.stdout.isatty() else 160).print(t)  # no truncated columns in logs


def _quantize_low_memory(model: str, config, calib: int | None, log, texts: list[str] | None = None):
    """``--low-memory``: GPTQ/AWQ a decoder layer at a time from fp32 safetensors (SmolLM2's cache or
    a Hugging Face folder), calibrated on ``texts`` (--calib-data) or the built-in text. Returns the model
    and the calibration windows it used."""
    from lowbit.algorithms.from_disk import quantize_from_disk
    from lowbit.errors import ConfigError
    from lowbit.models.smollm2 import _cache_path, load_smollm2, smollm2_gguf

    if model == "smollm2":
        folder = _cache_path(smollm2_gguf())
        import torch.distributed as dist

        ranks = dist.is_available() and dist.is_initialized()
        if not folder.is_dir() and (not ranks or dist.get_rank() == 0):
            # the GGUF -> fp32 safetensors conversion itself needs the whole model once (rank 0 alone)
            log.info("building the fp32 safetensors cache once (this step loads the whole model)")
            load_smollm2()  # writes the cache; the returned model is dropped at once
        if ranks:
            dist.barrier()  # the other ranks read the cache once rank 0 has written it
    elif Path(model).is_dir() and (Path(model) / "config.json").is_file():
        folder = Path(model)
    else:
        raise ConfigError(f"--low-memory applies to causal LMs (smollm2 or a Hugging Face folder), not {model}")
    log.info("low memory: layers read one at a time from %s; evaluate afterwards with `lowbit eval DIR`", folder)
    calibration = None
    if texts is not None:  # cut as in memory, with the folder's tokenizer (the skeleton holds no weights)
        from lowbit.algorithms._calib import calibration_from_samples
        from lowbit.algorithms.sequential import causal_lm_skeleton

        skeleton = causal_lm_skeleton(folder)
        if skeleton.tokenizer is None:
            raise ConfigError(f"{folder}: no tokenizer files to cut the --calib-data text with")
        calibration = calibration_from_samples(skeleton, texts, calib)
    return quantize_from_disk(folder, config, calibration_data=calibration, n_calib=calib), calibration


def _join_ranks(config, low_memory: bool, log) -> int | None:
    """Under ``torchrun`` (``WORLD_SIZE`` set): join the gloo process group and return this rank, else None.

    GPTQ, AWQ, SmoothQuant / the W/A presets and static calibration run across ranks (the calibration
    batches are sharded and their statistics reduced in a fixed order, so 1 and N ranks agree; see
    ``lowbit.algorithms.ranks``, ``gptq_ranks``); other schemes are refused. A collective waits at most
    ``LOWBIT_RANK_TIMEOUT_S`` seconds (default 600) for a peer; torchrun stops the other ranks when one dies.
    """
    import atexit
    import datetime
    import os

    import torch.distributed as dist

    from lowbit.algorithms.awq import AWQConfig
    from lowbit.algorithms.gptq import GPTQConfig
    from lowbit.algorithms.smoothquant import WAConfig
    from lowbit.algorithms.static import StaticConfig
    from lowbit.errors import ConfigError

    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return None
    if type(config) not in (GPTQConfig, AWQConfig, WAConfig, StaticConfig):
        raise ConfigError(f"across ranks (torchrun) `lowbit quantize` runs gptq, awq, awq-gptq, smoothquant, the "
                          f"w/a presets and w8a8-static, not {config.scheme}; run other schemes in one process")
    if low_memory and type(config) not in (GPTQConfig, AWQConfig):
        raise ConfigError(f"--low-memory (across ranks too) runs gptq, awq and awq-gptq, not {config.scheme}; "
                          "drop --low-memory")
    timeout = float(os.environ.get("LOWBIT_RANK_TIMEOUT_S", "600"))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    atexit.register(_leave_ranks)
    log.info("rank %d of %d (gloo)", dist.get_rank(), dist.get_world_size())
    return dist.get_rank()


def _leave_ranks() -> None:
    """At exit: wait for every rank, then tear the process group down. Ranks other than 0 finish first
    (rank 0 still measures and saves); tearing gloo down under a peer that is still connected aborted the
    process now and then ("terminate called without an active exception", exit -6), which torchrun reports
    as a failed job."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    except RuntimeError as exc:  # a rank already gone (it failed): nothing left to wait for
        log.debug("leaving ranks without the final barrier: %s", exc)
    dist.destroy_process_group()


def _calibration_texts(model, batches: list) -> list[str]:
    """The text of calibration batches: sentence lists as they are, token-id windows decoded."""
    if getattr(model, "task", None) == "causal-lm":
        return [model.tokenizer.decode(b.reshape(-1).tolist()) for b in batches]
    return [s for b in batches for s in b]


def _builtin_eval(model) -> list[str]:
    """lowbit's own evaluation texts for ``model``'s task (what --calib-data is checked against)."""
    from lowbit.data import eval_sentences, lm_eval_text, lm_heldout_text, lm_science_text

    if getattr(model, "task", None) == "causal-lm":
        return [lm_eval_text(), lm_heldout_text(), lm_science_text()]
    return eval_sentences(256)


def _measure_vs_rtn(fp32, qmodel, config, rows: list[dict], quick: bool, eval_samples, log) -> dict | None:
    """``--vs-rtn``: measure RTN on ``qmodel``'s own grid (:mod:`lowbit.analysis.rtn_baseline`) beside it,
    insert its row before the scheme's and return the comparison, or None where it does not apply (RTN
    itself, or a model whose quantized layers RTN cannot mirror: W/A, static, binary, rotated names)."""
    from lowbit.analysis.evaluate import evaluate
    from lowbit.analysis.rtn_baseline import baseline_for, compare_to_rtn, explain_losses, perplexity_losses

    twin = baseline_for(fp32, qmodel, config)
    if twin is None:
        log.info("--vs-rtn: %s has no RTN twin on its grid (see -v)", config.scheme)
        return None
    with step("measuring RTN on the same grid (use --no-vs-rtn to skip)") as st:
        row = evaluate(twin, fp32, quick=quick, eval_data=eval_samples)
        st.summary = "measured RTN on the same grid"
    rows.insert(len(rows) - 1, row)  # fp32, RTN, the scheme
    comparison = compare_to_rtn(rows[0], row, rows[-1])
    if perplexity_losses(comparison):
        with step(f"{config.scheme} is worse than RTN on a text: scoring it token by token") as st:
            explain_losses(comparison, fp32, twin, qmodel, quick=quick, eval_data=eval_samples)
            st.summary = "scored token by token"
    return comparison


def register(app: typer.Typer) -> None:
    @app.command()
    @clean_errors
    def quantize(
        model: Optional[str] = typer.Option(None, "--model", "-m",
                                            help="minilm | smollm2 | digits, a Hugging Face model folder "
                                                 "(config.json + safetensors + tokenizer) or a .gguf file"),
        scheme: Optional[str] = typer.Option(None, "--scheme", "-s", help="a scheme name (see --list-schemes)"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="folder to write (safetensors + metadata.json)"),
        force: bool = typer.Option(False, "--force", help="replace an existing --out folder"),
        list_schemes: bool = typer.Option(False, "--list-schemes", help="list schemes and exit"),
        bits: Optional[int] = typer.Option(None, "--bits", help="weight bits (rtn/gptq/awq): 2, 3, 4 or 8"),
        group_size: Optional[int] = typer.Option(None, "--group-size", help="group size along the input dim; 0 = per channel"),
        symmetric: Optional[bool] = typer.Option(None, "--symmetric/--affine", help="symmetric (absmax) or affine (min/max + zero-point)"),
        observer: Optional[str] = typer.Option(None, "--observer", help="static PTQ range observer: minmax|ema|percentile|mse|kl|output"),
        granularity: Optional[str] = typer.Option(None, "--granularity", help="per_tensor | per_channel"),
        calib: Optional[int] = typer.Option(None, "--calib", help="calibration samples (sentences / 512-token windows / images); from "
                                          "--calib-data spread over the file, at most 1024 / 128 / 2048 by default"),
        calib_data: Optional[Path] = typer.Option(None, "--calib-data",
                                                  help="calibrate on your data: .txt (a sample per line), .jsonl "
                                                       "(a \"text\" field per line) or .npy images"),
        eval_data: Optional[Path] = typer.Option(None, "--eval-data",
                                                 help="measure fidelity on your texts (.txt / .jsonl) instead of "
                                                      "lowbit's built-in evaluation texts"),
        alpha: Optional[str] = typer.Option(None, "--alpha", help="SmoothQuant migration strength in [0, 1] or 'none'"),
        rotate: bool = typer.Option(False, "--rotate", help="W/A presets on Llama-layout LMs: QuaRot Hadamard rotations "
                                                           "folded into the weights instead of SmoothQuant (a tied "
                                                           "LM head stays tied; its final norm rotates online)"),
        act_clip: Optional[float] = typer.Option(None, "--act-clip", help="W/A presets: activation grid over this "
                                                                          "fraction of each token's max |x| (e.g. 0.9)"),
        act_per_group: bool = typer.Option(False, "--act-per-group", help="W/A presets: one activation grid per "
                                                                          "token and weight group (not per token)"),
        act_affine: bool = typer.Option(False, "--act-affine", help="W/A presets: affine (min/max) activation grids"),
        tune_windows: Optional[int] = typer.Option(None, "--tune-windows",
                                                   help="gptaq-rot-tuned and W/A presets on Llama-layout LMs: then "
                                                        "tune the weight scales end to end on N calibration windows "
                                                        "(codes fixed; 0 = off; built-in: 96 windows of the mix, "
                                                        "up to ~310 with the 5x mix's text, e.g. 296)"),
        tune_epochs: Optional[int] = typer.Option(None, "--tune-epochs", help="passes over the tuning windows (1)"),
        tune_bf16: bool = typer.Option(False, "--tune-bf16", help="run the tuning's forward / backward in bf16 "
                                                                   "(~1.6x faster; scales stay fp16)"),
        kernel: Optional[str] = typer.Option(None, "--kernel", help="auto | fast | reference"),
        guard: bool = typer.Option(False, "--guard", help="hqq / sinq / hqq-sinq on causal LMs: a decoder linear "
                                                          "whose output error on 4 calibration windows is above "
                                                          "RTN's keeps RTN's codes; q_proj / k_proj as a pair, judged "
                                                          "on the attention output (reads calibration text)"),
        attention_hessian: Optional[bool] = typer.Option(
            None, "--attention-hessian/--plain-hessian",
            help="GPTQ-family schemes and awq-gptq / awq-gptaq: v_proj's GPTQ Hessian from its inputs mixed by the "
                 "attention probabilities (the default) or from the plain inputs"),
        residual_weights: Optional[bool] = typer.Option(
            None, "--residual-weights/--plain-tokens",
            help="GPTQ-family schemes and awq-gptaq (awq-gptq: off by default): o_proj / down_proj's GPTQ Hessian with each token weighted by 1 / mean square "
                 "of the residual stream after their add (the next norm's factor; the default), or every token alike"),
        attention_scales: Optional[bool] = typer.Option(
            None, "--attention-scales/--no-attention-scales",
            help="awq-gptq / awq-gptaq: AWQ's channel scale search for q/k/v (folded into input_layernorm), or none "
                 "(the MLP's scales stay)"),
        budget_mb: Optional[float] = typer.Option(None, "--budget-mb", help="mixed precision: size budget in MB"),
        max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="mixed precision: latency budget"),
        kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="KV-cache quantization for generation: int8 | int4"),
        gguf: Optional[str] = typer.Option(None, "--gguf", help="rtn/gptq/awq/awq-gptq on llama.cpp's grid (q4_0 | "
                                                                 "q4_1 | q8_0: blocks of 32; gptq and awq-gptq: q4_0), "
                                                                 "so `lowbit export` keeps the codes"),
        tie_embeddings: bool = typer.Option(False, "--tie-embeddings",
                                            help="rtn on a tied LM: the token embedding reads the quantized head's "
                                                 "table (stored once, at the head's width)"),
        no_eval: bool = typer.Option(False, "--no-eval", help="skip the fp32-vs-quantized measurement"),
        vs_rtn: bool = typer.Option(True, "--vs-rtn/--no-vs-rtn",
                                    help="weight-only schemes: also measure RTN on the same grid and warn on any "
                                         "text where the scheme is worse than RTN"),
        low_memory: bool = typer.Option(False, "--low-memory",
                                        help="gptq/awq on smollm2: read one decoder layer at a time from the fp32 "
                                             "safetensors cache, never holding the float model (implies --no-eval)"),
        quick: bool = typer.Option(False, "--quick", help="measure on fewer samples (faster, noisier)"),
        compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                                help="measure the quantized model under torch.compile "
                                                     "(default: on for encoders that the fused C encoder "
                                                     "does not run)"),
        as_json: bool = typer.Option(False, "--json", help="print the measured rows as JSON"),
    ) -> None:
        """Quantize MODEL with SCHEME, print size / speed / fidelity against fp32, save to --out."""
        import copy
        import json as _json
        import logging

        from lowbit.errors import ConfigError

        if list_schemes:
            _print_schemes()
            return
        if model is None or scheme is None:
            raise ConfigError("--model and --scheme are required (see --list-schemes)")
        from lowbit.config import build_config

        options = dict(bits=bits, group_size=group_size, symmetric=symmetric, observer=observer,
                       granularity=granularity, alpha=alpha, kernel=kernel, budget_mb=budget_mb,
                       max_latency_ms=max_latency_ms, kv_cache=kv_cache, gguf=gguf,
                       tie_embeddings=tie_embeddings or None, rotate=rotate or None, act_clip=act_clip,
                       act_per_group=act_per_group or None, act_symmetric=False if act_affine else None,
                       tune_windows=tune_windows, tune_epochs=tune_epochs, tune_bf16=tune_bf16 or None,
                       guard=guard or None, attention_hessian=attention_hessian,
                       residual_weights=residual_weights, attention_scales=attention_scales)
        config = build_config(scheme, options)  # --calib sizes the calibration set for any scheme
        if out is not None and out.exists() and not force:
            raise ConfigError(f"{out} exists; pass --force to replace it")

        import lowbit
        from lowbit.algorithms._calib import calibration_from_samples, default_calibration
        from lowbit.data.user import check_disjoint, read_samples
        from lowbit.io.open import open_model

        log = logging.getLogger("lowbit.cli")
        rank = _join_ranks(config, low_memory, log)
        if rank:  # ranks other than 0 quantize only: rank 0 measures and writes the folder (atomically)
            no_eval, out = True, None
        calib_samples = calib_record = eval_samples = None
        if calib_data is not None:
            calib_samples, calib_record = read_samples(calib_data)
        if eval_data is not None:
            eval_samples, _ = read_samples(eval_data)
            if not isinstance(eval_samples, list):
                raise ConfigError("--eval-data takes texts (.txt / .jsonl); image accuracy needs labels, which a "
                                  ".npy file does not carry")
        if low_memory and calib_samples is not None and not isinstance(calib_samples, list):
            raise ConfigError("--low-memory quantizes causal LMs: --calib-data takes a text (.txt / .jsonl) there")
        if low_memory:
            with step(f"quantizing {model} with {config.scheme}, one decoder layer at a time") as st:
                qmodel, calibration = _quantize_low_memory(model, config, calib, log, calib_samples)
                st.summary = f"{config.scheme}: {qmodel.lowbit_report.summary(qmodel)}"
            no_eval = True
        else:
            with step(f"loading {model}") as st:
                fp32 = open_model(model)
                if getattr(fp32, "lowbit_report", None) is not None:
                    raise ConfigError(f"{model} is already quantized ({getattr(fp32, 'lowbit_scheme', None) or 'imported'}"
                                      "); quantize the float model instead, or measure this one with `lowbit eval`")
                n = sum(p.numel() for p in fp32.parameters())
                st.summary = f"loaded {model}: {n / 1e6:.1f}M parameters, {4 * n / 1e6:.1f} MB in fp32"
            qmodel = copy.deepcopy(fp32)
            with step(f"quantizing with {config.scheme}") as st:
                if calib_samples is not None:
                    calibration = calibration_from_samples(qmodel, calib_samples, calib)
                else:
                    calibration = default_calibration(qmodel, calib) if calib else None
                lowbit.quantize(qmodel, config, calibration)
                st.summary = f"{config.scheme}: {qmodel.lowbit_report.summary(qmodel)}"
        if calib_record is not None and getattr(qmodel, "lowbit_calibration", None):
            record = dict(qmodel.lowbit_calibration, source=calib_record["source"],
                          file_sha256=calib_record["sha256"])
            if isinstance(calib_samples, list):  # the text the windows / sentences taken hold, not the whole file
                record["overlap_with_eval"] = check_disjoint(_calibration_texts(qmodel, calibration),
                                                             eval_samples or _builtin_eval(qmodel))
            qmodel.lowbit_calibration = record
        rows = []
        fidelity = {}
        if not no_eval:
            from lowbit.analysis.evaluate import evaluate

            with step("measuring fp32 (use --no-eval to skip)") as st:
                rows.append(evaluate(fp32, fp32, quick=quick, eval_data=eval_samples))
                st.summary = "measured fp32"
            fused = compile_ is None and callable(getattr(qmodel, "fused_runs", None)) and qmodel.fused_runs()
            use_compile = compile_ if compile_ is not None else (getattr(qmodel, "task", "") == "encoder" and not fused)
            measured = qmodel
            how = "compiled with torch.compile" if use_compile else "the fused C encoder" if fused else "eager"
            with step(f"measuring {config.scheme} ({how}; the first batches compile)" if use_compile
                      else f"measuring {config.scheme} ({how})") as st:
                if use_compile:
                    from lowbit.kernels.compile import compiled

                    measured = compiled(qmodel)
                rows.append(evaluate(measured, fp32, quick=quick, eval_data=eval_samples))
                st.summary = f"measured {config.scheme} ({how})"
            rows[-1]["compiled"] = bool(use_compile)
            fidelity = {k: v for k, v in rows[-1].items() if isinstance(v, (int, float, str))}
            if vs_rtn:
                comparison = _measure_vs_rtn(fp32, qmodel, config, rows, quick, eval_samples, log)
                if comparison is not None:
                    fidelity["vs_rtn"] = comparison
        if out is not None:
            with step(f"saving {out}") as st:
                meta = lowbit.save(qmodel, out, fidelity=fidelity, overwrite=force)
                st.summary = f"saved {out} ({meta.sizes['size_bytes'] / 1e6:.2f} MB: safetensors + metadata.json)"
        if rows:
            if as_json:
                typer.echo(_json.dumps(rows, indent=2))
            else:
                print_comparison(rows)
            if "vs_rtn" in fidelity:
                from lowbit.analysis.rtn_baseline import describe

                calibrated = bool(getattr(qmodel, "lowbit_calibration", None))
                lines, warnings = describe(config.scheme, fidelity["vs_rtn"], calibrated)
                if not as_json:
                    typer.echo("\n".join(lines))
                for w in warnings:
                    log.warning(w)
