"""`lowbit lint MODEL`: quantization-friendliness findings, each with a suggestion."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowbit.cli._common import clean_errors


def register(app: typer.Typer) -> None:
    @app.command("lint")
    @clean_errors
    def lint_command(
        model: str = typer.Argument(..., metavar="DIR_OR_MODEL", help="minilm | smollm2 | digits, or a saved model folder"),
        calib: Optional[int] = typer.Option(None, "--calib", help="calibration samples for activation statistics"),
        no_activations: bool = typer.Option(False, "--no-activations", help="skip the calibration pass"),
        out: Optional[Path] = typer.Option(None, "--json", help="write the findings as JSON here"),
    ) -> None:
        """Find what will quantize badly (ranges, outliers, kurtosis before/after rotation, SiLU, SE, deep-narrow,
        softmax, residual joins)."""
        import json

        from rich.console import Console
        from rich.table import Table

        from lowbit.algorithms._calib import default_calibration
        from lowbit.analysis.lint import lint
        from lowbit.cli.eval import _load_target
        from lowbit.io.atomic import atomic_write_text

        m = _load_target(model)
        batches = None
        if not no_activations:
            n = calib or {"causal-lm": 1, "encoder": 64, "classifier": 256}.get(getattr(m, "task", None))
            batches = default_calibration(m, n)
        report = lint(m, batches)
        t = Table(title=f"lint: {report.model} ({len(report.findings)} findings)", show_lines=True)
        for col in ("severity", "rule", "where", "finding", "suggestion"):
            t.add_column(col, overflow="fold")
        for f in report.findings:
            t.add_row(f.severity, f.rule, f.where, f.message, f.suggestion)
        Console().print(t)
        kurt = report.stats.get("kurtosis")
        if kurt:  # per linear kind: median / max over the blocks, before and after QuaRot's rotation
            from lowbit.analysis.lint import kurtosis_by_kind

            k = Table(title="activation kurtosis per token across input channels (Gaussian = 3)")
            for col in ("linear input", "layers", "median before", "max before", "median after", "max after"):
                k.add_column(col)
            fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
            for kind, v in kurtosis_by_kind(kurt).items():
                k.add_row(kind, str(v["n"]), fmt(v["median_before"]), fmt(v["max_before"]), fmt(v["median_after"]),
                          fmt(v["max_after"]))
            Console().print(k)
        counts = {}
        for f in report.findings:
            counts[f.rule] = counts.get(f.rule, 0) + 1
        typer.echo("summary: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) if counts else "no findings")
        if out is not None:
            atomic_write_text(out, json.dumps(report.to_json(), indent=1, default=str))
            typer.echo(f"report: {out}")
