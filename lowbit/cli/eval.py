"""`lowbit eval DIR_OR_MODEL [--json] [--quick]`: measure a model's fidelity, size and speed vs fp32."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lowbit.cli._common import clean_errors


def _load_target(target: str):
    """A bundled model name, a saved lowbit folder, a Hugging Face folder or a .gguf file."""
    from lowbit.io.open import open_model

    return open_model(target)


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lowbit eval: {result['model']} ({result['scheme']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if isinstance(value, float):
            text = f"{value:.6g}"
        else:
            text = str(value)
        table.add_row(key, text)
    Console().print(table)


def _source_reference(model):
    """The fp32 model a saved folder was quantized from, when its source folder still exists (a
    bundled model is its own reference inside ``evaluate``)."""
    from lowbit.models import MODELS

    meta = getattr(model, "lowbit_metadata", None)
    if meta is None or meta.model in MODELS or not meta.source:
        return None
    src = Path(meta.source)
    if (src / "config.json").is_file():
        from lowbit.models.hf import load_hf

        return load_hf(src)
    return None


def _compare_with_rtn(model, ref, result: dict, quick: bool, texts) -> tuple[dict, list[str]]:
    """``--vs-rtn``: fp32 and RTN on ``model``'s own grid measured like ``model`` (:mod:`lowbit.analysis.rtn_baseline`);
    the comparison and its report lines (its warnings are logged)."""
    import logging

    from lowbit.analysis.evaluate import evaluate
    from lowbit.analysis.rtn_baseline import baseline_for, compare_to_rtn, describe, explain_losses
    from lowbit.errors import ConfigError
    from lowbit.models import MODELS

    meta = getattr(model, "lowbit_metadata", None)
    config = getattr(model, "lowbit_config", None)
    if meta is None or not meta.is_quantized:
        raise ConfigError("--vs-rtn compares a quantized model with RTN on its grid; this one is not quantized")
    if ref is None and meta.model in MODELS:
        ref = _load_target(meta.model)
    if ref is None:
        raise ConfigError("--vs-rtn needs the fp32 model the folder was quantized from: pass --reference")
    twin = baseline_for(ref, model, config)
    if twin is None:
        raise ConfigError(f"--vs-rtn: {meta.scheme} has no RTN twin (it is RTN itself, or its quantized layers are not "
                          "weight-only linears with float twins of the same name in the reference)")
    comparison = compare_to_rtn(evaluate(ref, ref, quick=quick, eval_data=texts),
                                evaluate(twin, ref, quick=quick, eval_data=texts), result)
    explain_losses(comparison, ref, twin, model, quick=quick, eval_data=texts)
    lines, warnings = describe(meta.scheme, comparison, meta.calibration is not None)
    for w in warnings:
        logging.getLogger("lowbit.cli").warning(w)
    return comparison, lines


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @clean_errors
    def eval_command(
        target: str = typer.Argument(..., metavar="DIR_OR_MODEL",
                                     help="A saved lowbit folder, a Hugging Face model folder, a .gguf file, or minilm | smollm2 | digits."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
        quick: bool = typer.Option(False, "--quick", help="Fewer sentences/windows and repeats (for smoke tests)."),
        kv_cache: str = typer.Option(None, "--kv-cache", help="causal LMs: run through an int8 | int4 KV cache"),
        kv_sink: int = typer.Option(None, "--kv-sink", help="with --kv-cache: the first N tokens of each sequence "
                                                           "(the attention sink) stay full precision (default 1; "
                                                           "0 quantizes every token)"),
        eval_data: Path = typer.Option(None, "--eval-data", help="your evaluation texts (.txt / .jsonl) instead of "
                                                                 "lowbit's built-in ones"),
        reference: str = typer.Option(None, "--reference", help="the fp32 model to compare with (default: the "
                                                                "bundled model, or the folder the model was "
                                                                "quantized from when it still exists)"),
        vs_rtn: bool = typer.Option(False, "--vs-rtn", help="a weight-only quantized model: also measure fp32 and "
                                                            "RTN on the same grid, and warn where the model is worse "
                                                            "than RTN"),
    ) -> None:
        """Evaluate a model: fidelity vs fp32 (cosine / perplexity+KL / accuracy), exact size, throughput."""
        from lowbit.analysis.evaluate import evaluate

        from lowbit.data.user import read_samples
        from lowbit.errors import ConfigError

        if kv_sink is not None and kv_cache is None:
            raise ConfigError("--kv-sink needs --kv-cache (it says which tokens that cache keeps in full precision)")
        if kv_sink is not None and kv_sink < 0:
            raise ConfigError(f"--kv-sink takes a token count >= 0, got {kv_sink}")
        model = _load_target(target)
        texts = None
        if eval_data is not None:
            texts, _ = read_samples(eval_data)
            if not isinstance(texts, list):
                raise ConfigError("--eval-data takes texts (.txt / .jsonl)")
        ref = _load_target(reference) if reference else _source_reference(model)
        if kv_cache is not None:
            from lowbit.nn.kv_cache import KVCacheLM

            from lowbit.nn.kv_cache import DEFAULT_SINK

            sink = DEFAULT_SINK if kv_sink is None else kv_sink
            model = KVCacheLM(model, kv_cache, sink=sink)  # chunked forward through the quantized cache
        if vs_rtn and kv_cache is not None:
            raise ConfigError("--vs-rtn compares weights: drop --kv-cache for it")
        result = evaluate(model, ref, quick=quick, eval_data=texts)
        lines: list[str] = []
        if vs_rtn:
            result["vs_rtn"], lines = _compare_with_rtn(model, ref, result, quick, texts)
        if as_json:
            typer.echo(json.dumps(result))
        else:
            _print_table({k: v for k, v in result.items() if k != "vs_rtn"})
            if lines:
                typer.echo("\n".join(lines))
