"""The README and the documentation pages hold to the code: the troubleshooting page quotes what the code really
prints, and every relative link of the README leads to a file of the repository (the docs site's own links are
checked by its strict build in tests/test_docs.py, the README's too: it is the site's home page)."""

from __future__ import annotations

import builtins
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = REPO / "infra" / "docs" / "pages"
# Messages that come from outside the project (the kernel, Ray), not from `pipeline/`, and the Ray command that
# prints one.
EXTERNAL = {"Bus error", "No space left on device", "Missing authentication token", "ray job submit"}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def troubleshooting_quotes() -> list[str]:
    page = (PAGES / "troubleshooting.md").read_text()
    rows = [line.split(" | ")[0] for line in page.splitlines() if line.startswith("| `")]
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
        assert part in SOURCE, f"{part!r} (from the troubleshooting page's {quote!r}) is in no message of pipeline/"


def readme_links() -> list[str]:
    return [target for target in LINK.findall((REPO / "README.md").read_text()) if not re.match(r"[a-z]+:", target)]


def readme_anchors() -> set[str]:
    """The ids GitHub and MkDocs give the README's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", (REPO / "README.md").read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_readme_links_into_the_docs() -> None:
    links = readme_links()
    pages = {Path(link.partition("#")[0]).name for link in links if link.startswith("infra/docs/pages/")}
    assert {"data.md", "training.md", "faults.md", "evaluation.md", "use-your-model.md", "troubleshooting.md",
            "reference.md", "architecture.md"} <= pages, pages


@pytest.mark.parametrize("link", readme_links())
def test_every_relative_link_of_the_readme_resolves(link: str) -> None:
    path, _, anchor = link.partition("#")
    if not path:
        assert anchor in readme_anchors(), f"README.md links to #{anchor}, a heading it does not have"
        return
    assert (REPO / path).is_file(), f"README.md links to {path}, which is not a file of the repository"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    """What a contributor runs is what CI runs: the last line of the README's Test block is `.ci/run`'s last line."""
    section = (REPO / "README.md").read_text().split("\n## Test\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert block, "README.md's Test section has no bash block"
    command = block.group(1).strip().splitlines()[-1]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] == command, f".ci/run ends with {ci[-1]!r}, the README's test command is {command!r}"
