"""The README's troubleshooting table quotes what the code really prints."""

from __future__ import annotations

import builtins
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Messages that come from outside the project (the kernel, Ray), not from `pipeline/`.
EXTERNAL = {"Bus error", "No space left on device", "Missing authentication token"}


def troubleshooting_quotes() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| `")]
    return [quote for row in rows for quote in re.findall(r"`([^`]+)`", row) if quote not in EXTERNAL]


SOURCE = "\n".join(path.read_text() for path in sorted((REPO / "pipeline").rglob("*.py")))


def test_the_table_has_quotes() -> None:
    assert len(troubleshooting_quotes()) >= 7


@pytest.mark.parametrize("quote", troubleshooting_quotes())
def test_troubleshooting_quote_matches_a_real_message(quote: str) -> None:
    """`Type: part ... part`: Type is an exception the project raises (or a builtin one) and every part between the
    `...` placeholders is written literally in a message in `pipeline/`."""
    kind, _, message = quote.partition(": ")
    if re.fullmatch(r"[A-Z]\w*Error", kind):
        assert f"class {kind}(" in SOURCE or hasattr(builtins, kind), f"no exception {kind}"
    else:
        message = quote
    parts = [part for part in message.split("...") if part.strip()]
    assert parts, quote
    for part in parts:
        assert part in SOURCE, f"{part!r} (from the README's {quote!r}) is in no message of pipeline/"
