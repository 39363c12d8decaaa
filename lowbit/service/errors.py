"""Service errors and the HTTP status each one maps to.

Every error a client can cause is a :class:`~lowbit.errors.LowbitError` subclass with a message
naming what was wrong and what is valid; :func:`status_for` turns it into a 4xx. Nothing maps to a
500: an unexpected exception becomes a 503 (see ``app.py``), logged with its traceback.
"""

from __future__ import annotations

import os
import re

from lowbit.errors import CalibrationError, ConfigError, LoadError, LowbitError

# The directories of an absolute path ("/srv/store/m/x.json" -> ".../x.json"); URLs are left alone.
_ABS_DIRS = re.compile(r"(?<![\w/.~:-])/(?:[^\s'\"()<>:,;/]+/)+")


class InvalidModelId(ConfigError):
    """A model id that is not a plain folder name inside the store (422)."""


class ModelNotFound(LowbitError):
    """No model folder with this id in the store (404)."""


class ModelUnavailable(LoadError):
    """The folder exists but cannot be served: corrupted, unreadable or the wrong task (409)."""


class Conflict(LowbitError):
    """The request contradicts the current state, e.g. overwriting the active model (409)."""


class NotFound(LowbitError):
    """An unknown job or resource (404)."""


class InputTooLarge(ConfigError):
    """A batch or input over a configured limit; the message names the limit (422)."""

    def __init__(self, message: str, reason: str = "limit"):
        super().__init__(message)
        self.reason = reason  # batch | input_length | tokens | ... (the /metrics label)


class Unauthorized(LowbitError):
    """A mutating request without the right Bearer API key (401)."""


class BodyTooLarge(LowbitError):
    """A request body over the configured byte limit, declared or streamed (413)."""


class Overloaded(LowbitError):
    """Too many requests in flight or jobs queued; retry later (429)."""


class NoActiveModel(LowbitError):
    """No model is loaded for serving (503)."""


class NotRecorded(LowbitError):
    """The service could not write a record it needs (e.g. ``.active.json``); nothing changed (503)."""


def redact_paths(text: str, root: str | os.PathLike | None = None) -> str:
    """``text`` without server paths, for clients: paths under ``root`` become relative to it (a
    model id and file name), any other absolute path keeps only its file name. Log the original."""
    if root is not None:
        root = str(root).rstrip(os.sep)
        text = text.replace(root + os.sep, "").replace(root, "<store>")
    return _ABS_DIRS.sub(".../", text)


def status_for(exc: LowbitError) -> int:
    """The HTTP status for a library or service error."""
    for cls, status in (
        (Unauthorized, 401),
        (BodyTooLarge, 413),
        (ModelNotFound, 404),
        (NotFound, 404),
        (ModelUnavailable, 409),
        (Conflict, 409),
        (Overloaded, 429),
        (NoActiveModel, 503),
        (NotRecorded, 503),
        (ConfigError, 422),
        (CalibrationError, 422),
        (LoadError, 409),
    ):
        if isinstance(exc, cls):
            return status
    return 422
