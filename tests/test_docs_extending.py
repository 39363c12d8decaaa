"""docs/extending.md's code blocks run as written (and leave the registries as they found them)."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture
def clean_registries():
    from lowbit.api import HANDLERS
    from lowbit.config import CONFIGS, SCHEMES, _load_builtin_configs
    from lowbit.core.formats import FORMATS
    from lowbit.models.adapters import ADAPTERS

    _load_builtin_configs()
    saved = [(d, dict(d)) for d in (HANDLERS, CONFIGS, SCHEMES, FORMATS, ADAPTERS)]
    yield
    for d, copy in saved:
        d.clear()
        d.update(copy)


def test_the_page_has_three_examples():
    assert len(BLOCKS) == 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_example_runs(i, clean_registries):
    """Each block asserts its own outcome; here: it ran to the end and registered what it names."""
    ns = {"__name__": f"docs_extending_{i}"}
    exec(compile(BLOCKS[i], f"{DOC}:block{i}", "exec"), ns)
    from lowbit.config import SCHEMES
    from lowbit.core.formats import FORMATS
    from lowbit.models.adapters import ADAPTERS

    assert ("olmo" in ADAPTERS, "example-int8" in SCHEMES, "int6" in FORMATS)[i]
