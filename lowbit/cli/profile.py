"""`lowbit profile`: measure a hardware profile (per-layer latency per precision) for this machine."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lowbit.cli._common import clean_errors


def register(app: typer.Typer) -> None:
    @app.command("profile")
    @clean_errors
    def profile_command(
        model: List[str] = typer.Option(["minilm"], "--model", "-m", help="models whose layer shapes to profile"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="profile JSON (default: the lowbit cache)"),
        repeats: int = typer.Option(15, "--repeats", help="timed runs per layer and precision (median kept)"),
        threads: int = typer.Option(1, "--threads", help="torch threads while measuring"),
        clock: str = typer.Option("thread", "--clock", help="thread (CPU time of the measuring thread) | wall"),
    ) -> None:
        """Micro-benchmark every linear shape of MODEL(s) at every precision; write the profile JSON."""
        from rich.console import Console
        from rich.table import Table

        from lowbit.errors import ConfigError
        from lowbit.mixed.profile import HardwareProfile, default_profile_path, new_profile, profile_model
        from lowbit.models import load_model

        if clock not in ("thread", "wall"):
            raise ConfigError(f"--clock must be thread or wall, got {clock!r}")
        if clock == "thread" and threads != 1:
            raise ConfigError("--clock thread measures one thread's CPU time: use it with --threads 1, or --clock wall")
        path = out or default_profile_path()
        profile = new_profile(threads=threads, clock=clock)
        if path.is_file():
            old = HardwareProfile.load(path)
            if old.threads == threads and old.clock == clock:
                profile.merge(old)
        for name in model:
            profile_model(load_model(name), profile, repeats=repeats)
        profile.save(path)
        t = Table(title=f"latency (µs, median, {clock} clock, {threads} thread) on {profile.machine['cpu']}")
        t.add_column("shape@tokens")
        for c in profile.choices:
            t.add_column(c, justify="right")
        for key, row in sorted(profile.latency_us.items()):
            t.add_row(key, *[f"{row[c]['median']:.0f}" if c in row else "n/a" for c in profile.choices])
        Console().print(t)
        for name, info in profile.models.items():
            typer.echo(f"{name}: fp32 forward {info['fp32_forward_us']['median'] / 1e3:.1f} ms "
                       f"({info['workload']}), linears {info['linear_fp32_us'] / 1e3:.1f} ms, "
                       f"rest {info['rest_us'] / 1e3:.1f} ms")
        typer.echo(f"profile: {path}")
