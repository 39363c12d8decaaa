"""Helpers shared by CLI commands: turning library errors into one clean line and exit code 2."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import typer

from lowbit.errors import LowbitError

F = TypeVar("F", bound=Callable)


def clean_errors(fn: F) -> F:
    """Report a LowbitError as `error: message` with exit code 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LowbitError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]
