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


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @clean_errors
    def eval_command(
        target: str = typer.Argument(..., metavar="DIR_OR_MODEL",
                                     help="A saved lowbit folder, a Hugging Face model folder, a .gguf file, or minilm | smollm2 | digits."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
        quick: bool = typer.Option(False, "--quick", help="Fewer sentences/windows and repeats (for smoke tests)."),
        kv_cache: str = typer.Option(None, "--kv-cache", help="causal LMs: run through an int8 | int4 KV cache"),
    ) -> None:
        """Evaluate a model: fidelity vs fp32 (cosine / perplexity+KL / accuracy), exact size, throughput."""
        from lowbit.analysis.evaluate import evaluate

        model = _load_target(target)
        if kv_cache is not None:
            from lowbit.nn.kv_cache import KVCacheLM

            model = KVCacheLM(model, kv_cache)  # chunked forward through the quantized cache
        result = evaluate(model, quick=quick)
        if as_json:
            typer.echo(json.dumps(result))
        else:
            _print_table(result)
