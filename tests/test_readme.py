"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_after(heading: str | None) -> str:
    """The first ```python block of README.md after the line ``heading`` (or the first block)."""
    text = README.read_text()
    if heading is not None:
        lines = text.splitlines()
        assert heading in lines, f"README.md has no line {heading!r}"
        text = "\n".join(lines[lines.index(heading) :])
    match = re.search(r"```python\n(.*?)```", text, re.DOTALL)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


@pytest.mark.parametrize("heading", [None, "### The routing layer"], ids=["introduction", "routing layer"])
def test_readme_example_runs(heading):
    code = python_block_after(heading)
    exec(compile(code, f"README.md ({heading or 'introduction'})", "exec"), {})
