"""The raw texts lowbit's fixed data sets are cut from: all ship with CPython, so nothing is downloaded.

- The Python documentation topics (``pydoc_data.topics.topics``, ~80 reference pages of English
  prose and code). Topics are split into two disjoint halves by a hash of their name: one half
  feeds evaluation, the other calibration, so calibrating on one never sees the other's text.
- The Python licence (``LICENSE.txt`` in the stdlib folder), ~14 kB of legal English: the
  perplexity text for causal LMs (PEERS.md's "licence text").
- scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``, ~43 kB of scientific
  prose about measured data sets, with summary-statistics tables and references): the third
  perplexity text for causal LMs, of another domain. scikit-learn is a dependency (BSD-3-Clause).

The exact text depends on the CPython version installed (3.11 here); within one install every
function below returns the same value on every call.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sysconfig

from lowbit.errors import ConfigError

_HEADING_RULE = re.compile(r"^[*=\-~^\"]{3,}\s*$")


def _topic_half(name: str) -> str:
    """'eval' or 'calib': a fixed assignment of a docs topic to one half, by a hash of its name."""
    return "eval" if hashlib.sha256(name.encode()).digest()[0] % 2 == 0 else "calib"


@functools.cache
def docs_topics() -> dict[str, str]:
    """The Python documentation's topic pages, name → text, as shipped in pydoc_data."""
    from pydoc_data.topics import topics

    return dict(topics)


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running prose in a docs page: unindented blocks, lines joined, markup removed.

    Indented blocks (code, grammar rules, tables, nested notes) and heading underlines are dropped.
    """
    paragraphs, current = [], []
    for line in text.splitlines() + [""]:
        if not line.strip() or line[:1].isspace() or _HEADING_RULE.match(line):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(line.strip())
    cleaned = []
    for p in paragraphs:
        p = p.replace("**", "")
        p = re.sub(r"\s*\[\d+\]", "", p)  # footnote references like "[5]"
        p = re.sub(r"\s+", " ", p).strip()
        if p:
            cleaned.append(p)
    return cleaned


@functools.cache
def docs_prose(half: str) -> tuple[str, ...]:
    """Prose paragraphs of the docs topics in one half ('eval' or 'calib'), in sorted topic order."""
    if half not in ("eval", "calib"):
        raise ConfigError(f"unknown half {half!r}; valid: eval, calib")
    out: list[str] = []
    for name in sorted(docs_topics()):
        if _topic_half(name) == half:
            out.extend(prose_paragraphs(docs_topics()[name]))
    return tuple(out)


@functools.cache
def license_text() -> str:
    """The CPython LICENSE.txt shipped next to the stdlib, whitespace-normalised per line."""
    path = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the Python licence text at {path}: {exc}") from None
    return "\n".join(line.rstrip() for line in raw.splitlines()).strip() + "\n"


_RST_TARGET = re.compile(r"^\.\. _[^:]*:.*$")  # ".. _iris_dataset:" anchors (no text of their own)


@functools.cache
def dataset_descriptions() -> tuple[tuple[str, str], ...]:
    """(file name, text) of scikit-learn's dataset descriptions, sorted by name; anchor lines
    (``.. _name:``) removed, lines right-stripped, otherwise as shipped."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # located, not imported (importing sklearn takes seconds)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the science evaluation text needs scikit-learn's dataset descriptions; "
                          "scikit-learn is not installed")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "descr")
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".rst"))
    except OSError as exc:
        raise ConfigError(f"cannot list scikit-learn's dataset descriptions in {folder}: {exc}") from None
    if not names:
        raise ConfigError(f"no dataset descriptions (*.rst) in {folder}")
    out = []
    for name in names:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            lines = [ln.rstrip() for ln in f.read().splitlines() if not _RST_TARGET.match(ln)]
        out.append((name, "\n".join(lines).strip() + "\n"))
    return tuple(out)
