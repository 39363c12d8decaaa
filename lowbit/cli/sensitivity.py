"""`lowbit sensitivity MODEL`: per-layer sensitivity ranked table + PNG bar chart (+ JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowbit.cli._common import clean_errors


def short_name(name: str) -> str:
    return name.replace("bert.encoder.layer.", "L").replace("lm.model.layers.", "L")


def save_chart(report, path: Path, top: int = 40) -> Path:
    """Bar chart of each unit's drift at every choice (log scale), most sensitive first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rank_choice = report.choices[0]
    ranked = report.ranked(rank_choice)[:top]
    names = [u for u, _ in ranked]
    fig, ax = plt.subplots(figsize=(max(8, 0.32 * len(names) + 3), 5))
    width = 0.8 / len(report.choices)
    for k, c in enumerate(report.choices):
        vals = [max(e["choices"][c].get("drift", 0) or 0, 1e-12) if e["choices"][c].get("allowed") else np.nan
                for _, e in ranked]
        ax.bar(np.arange(len(names)) + k * width, vals, width, label=c)
    ax.set_yscale("log")
    ax.set_ylabel(f"drift when alone quantized: {report.metric}")
    ax.set_title(f"{report.model}: per-{report.group_by} sensitivity (ranked by {rank_choice})")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
    ax.set_xticklabels([short_name(n) for n in names],
                       rotation=75, ha="right", fontsize=7)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def register(app: typer.Typer) -> None:
    @app.command("sensitivity")
    @clean_errors
    def sensitivity_command(
        model: str = typer.Argument(..., help="minilm | smollm2 | digits"),
        choices: str = typer.Option("w2,w3,w4,w8,w8a8", "--choices", help="comma-separated precision choices"),
        group_by: Optional[str] = typer.Option(None, "--group-by",
                                               help="layer | parent | block (default: parent for smollm2, else layer)"),
        calib: Optional[int] = typer.Option(None, "--calib", help="calibration samples (sentences / windows / images)"),
        max_tokens: int = typer.Option(256, "--max-tokens", help="LM calibration windows cut to this many tokens"),
        hessian: int = typer.Option(2, "--hessian", help="Hutchinson samples for the Hessian trace (0 = skip)"),
        rank_by: Optional[str] = typer.Option(None, "--rank-by", help="choice to rank by (default: the first)"),
        top: int = typer.Option(30, "--top", help="rows to print"),
        png: Path = typer.Option(Path("sensitivity.png"), "--png", help="bar chart to write"),
        out: Optional[Path] = typer.Option(None, "--json", help="write the full report as JSON here"),
    ) -> None:
        """Quantize each layer alone at each precision; rank layers by the output drift it causes."""
        import json
        import sys

        from rich.console import Console
        from rich.table import Table

        from lowbit.io.atomic import atomic_write_text
        from lowbit.mixed.sensitivity import cached_sensitivity
        from lowbit.models import load_model

        m = load_model(model)
        cs = tuple(c.strip() for c in choices.split(",") if c.strip())
        gb = group_by or ("parent" if m.task == "causal-lm" else "layer")
        n = calib or {"causal-lm": 2, "encoder": 64}.get(m.task)
        report = cached_sensitivity(m, choices=cs, group_by=gb, n_calib=n,
                                    max_tokens=max_tokens if m.task == "causal-lm" else None,
                                    hessian_samples=hessian)
        rc = rank_by or cs[0]
        t = Table(title=f"{model}: sensitivity per {gb} ({report.metric}; calibration {report.calibration.get('n_samples')} "
                        f"samples), ranked by {rc}")
        for col in ["rank", "unit", "params", "Tr(H)", *[f"drift {c}" for c in cs], f"SQNR dB {rc}",
                    f"loss Δ {rc}", f"HAWQ {rc}"]:
            t.add_column(col, justify="right")

        def f(v, spec=".3g"):
            return "—" if v is None else (v if isinstance(v, str) else format(v, spec))

        for i, (u, e) in enumerate(report.ranked(rc)[:top], 1):
            r = e["choices"][rc]
            t.add_row(str(i), short_name(u), f"{e['params']:,}", f(e.get("hessian_trace")),
                      *[f(e["choices"][c].get("drift")) if e["choices"][c].get("allowed") else "n/a" for c in cs],
                      f(r.get("sqnr_db"), ".1f"), f(r.get("loss_delta")), f(r.get("hawq")))
        Console(width=None if sys.stdout.isatty() else 200).print(t)
        save_chart(report, png)
        typer.echo(f"chart: {png}")
        if out is not None:
            atomic_write_text(out, json.dumps(report.to_json(), indent=1))
            typer.echo(f"report: {out}")
