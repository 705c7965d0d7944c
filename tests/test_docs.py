"""The README and docs/ as a reader follows them: every relative link (and its #anchor) resolves, every `patcher ...`
command they show names a command and options that exist, and the README fits on a few screens."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest
import typer

from patcher.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`(patcher [^`]+)`")
BLOCK_LINE = re.compile(r"^(?:    |\t)\s*(?:\$ )?(patcher .*)$")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def links() -> list[tuple[Path, str]]:
    found = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if not re.match(r"^[a-z]+:", target):  # relative: not http:, https:, mailto:
                found.append((page, target))
    return found


@pytest.mark.parametrize(("page", "target"), links(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_relative_link_resolves(page: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    assert resolved.exists(), f"{page.name}: {target} does not exist"
    if anchor and resolved.suffix == ".md":
        assert anchor in anchors(resolved), f"{page.name}: #{anchor} is no heading of {resolved.name}"


def commands() -> list[tuple[Path, str]]:
    """Every `patcher ...` command shown: code-block lines (continuations joined) and inline code spans."""
    found = []
    for page in PAGES:
        text = page.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            match = BLOCK_LINE.match(line)
            if match:
                found.append((page, match.group(1)))
        for span in CODE_SPAN.findall(text):
            found.append((page, span.replace("\\|", "|")))
    return found


def words(command: str) -> list[str]:
    """The command's words: a trailing comment, shell continuations (&&, |, ;) and placeholders dropped."""
    command = re.split(r"\s{2,}#|\s#\s", command)[0]
    command = re.split(r"\s(?:&&|;|\|)\s", command)[0]
    tokens = shlex.split(command.replace("[", " [ ").replace("]", " ] "))
    kept, depth = [], 0
    for token in tokens:
        depth += token == "["
        if depth == 0 and token not in ("...", "]") and not token.endswith("..."):
            kept.append(token)
        depth -= token == "]"
    return kept[1:]


@functools.cache
def root_command() -> typer.core.TyperGroup:
    return typer.main.get_command(app)


@pytest.mark.parametrize(("page", "command"), commands(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_command_shown_parses(page: Path, command: str) -> None:
    arguments = words(command)
    root = root_command()
    if not arguments or arguments[0].startswith("-"):
        assert all(a in ("--version", "--help", "-h") for a in arguments), f"{page.name}: {command}"
        return
    sub = root.get_command(root.context_class(root), arguments[0])
    assert sub is not None, f"{page.name}: no command {arguments[0]!r} in {command!r}"
    known = {name for parameter in sub.params for name in (*parameter.opts, *parameter.secondary_opts)}
    known |= {"--help", "-h"}
    for word in arguments[1:]:
        if word.startswith("--"):
            assert word.split("=")[0] in known, f"{page.name}: {arguments[0]} has no option {word} ({command!r})"
        elif word.startswith("-") and len(word) == 2:
            assert word in known, f"{page.name}: {arguments[0]} has no option {word} ({command!r})"


def test_the_commands_are_found_and_a_wrong_one_fails() -> None:
    shown = commands()
    assert len(shown) > 40 and len({page for page, _ in shown}) >= 5
    with pytest.raises(AssertionError, match="has no option --out"):
        test_every_command_shown_parses(ROOT / "README.md", "patcher deploy REPO --out DIR")
    with pytest.raises(AssertionError, match="no command 'depoly'"):
        test_every_command_shown_parses(ROOT / "README.md", "patcher depoly REPO")


def test_the_readme_fits_and_keeps_its_quickstart() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert "    bash scripts/demo.sh " in quickstart
    assert "    .venv/bin/ruff check patcher tests bench && .venv/bin/python -m pytest -q -n 2 " in quickstart


SOURCE_PATH = re.compile(r"(?<![\w./-])((?:[a-z_]+/)+[\w*]+\.py|(?:[a-z_]+/)+)(?![\w/])")


def architecture_paths() -> list[str]:
    """Every module or package path docs/architecture.md names (`stages/bench.py`, `triton/repository/`)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    return sorted({match for match in SOURCE_PATH.findall(text) if not match.startswith(("http", "www"))})


def test_every_path_the_architecture_names_exists() -> None:
    """The walks and package lists of docs/architecture.md match the tree: a path is under the root, patcher/, or
    (named inside its package's entry, as `repository/writer.py` under triton/) a package of patcher/."""
    paths = architecture_paths()
    assert "stages/bench.py" in paths and "triton/repository/writer.py" in paths
    missing = [path for path in paths
               if not any(any(ROOT.glob(pattern + path.rstrip("/"))) for pattern in ("", "patcher/", "patcher/**/"))]
    assert missing == []
