"""The README and docs/ name only things that exist: every repository path, every `llava-edge VERB --flag`
of a command line (the flag must be one of that verb's), and every flag written inline in backticks.

Why: a newcomer copies these lines first. Paths and flags drift as code moves (an earlier round found four
test paths in the docs that no longer existed); this test is how a rename finds its stale mentions.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: A path as the docs write one: a top-level folder of the repository, then a file or folder name.
PATH = re.compile(r"(?<![\w./-])((?:llava_edge|tests|docs|benchmarks|examples|\.ci)/[\w./{},*-]*[\w*}])")
#: Paths written relative to the package (docs/architecture.md's layering text says `export/factory.py`).
PACKAGE_DIRS = ("llava_edge",)
#: Flags in backticks that belong to other programs, with whose they are.
FOREIGN_FLAGS = {"--use-fake-device-for-media-stream": "Chromium (docs/serving.md's camera test)",
                 "--dist": "pytest-xdist (the README's test command)"}
#: docs/errors.md writes bad command lines on purpose (an unknown flag, a closed pipe): tests/robust
#: runs each of its rows, so its command lines are not read here.
BAD_INPUT_TABLES = {"errors.md"}


@cache
def _verbs() -> dict[str, set[str]]:
    import typer

    from llava_edge.cli import app

    group = typer.main.get_command(app)
    return {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")} | {"--help"}
            for name, cmd in group.commands.items()}


@cache
def _script_flags() -> set[str]:
    """Flags of the argparse scripts (python -m llava_edge.synthetic.train, benchmarks/...)."""
    found: set[str] = set()
    for py in [*ROOT.glob("llava_edge/**/*.py"), *ROOT.glob("benchmarks/**/*.py"), *ROOT.glob("examples/*.py")]:
        found.update(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", py.read_text()))
    return found


def _expand(path: str) -> list[str]:
    """`bench_{a,b}.py` -> `bench_a.py`, `bench_b.py` (shell brace expansion, as the docs use it)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [x for alt in m.group(1).split(",") for x in _expand(path[: m.start()] + alt + path[m.end():])]


def _exists(path: str, doc: Path) -> bool:
    for p in _expand(path.split("::")[0].rstrip(".")):
        bases = [ROOT, doc.parent, *(ROOT / d for d in PACKAGE_DIRS)]
        if not any(list(b.glob(p)) if "*" in p else (b / p).exists() for b in bases):
            return False
    return True


def _command_lines(text: str) -> list[tuple[str, str]]:
    """(verb, its arguments) for every `llava-edge VERB ...` up to the end of that command (a comment, a
    backtick, `&&`, `|`, `;` or the line's end)."""
    out = []
    for line in text.splitlines():
        for m in re.finditer(r"llava-edge ([a-z][a-z-]*)([^`#\n]*)", line):
            out.append((m.group(1), re.split(r"&&|\|\||\||;", m.group(2))[0]))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_the_docs_name_exists(doc: Path) -> None:
    missing = sorted({m.group(1) for m in PATH.finditer(doc.read_text()) if not _exists(m.group(1), doc)})
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_flag_the_docs_use_is_the_verbs_own(doc: Path) -> None:
    verbs = _verbs()
    text = doc.read_text()
    wrong = []
    if doc.name not in BAD_INPUT_TABLES:
        for verb, args in _command_lines(text):
            if verb not in verbs:
                continue  # a word after "llava-edge" in prose ("llava-edge serves ...")
            wrong += [f"llava-edge {verb} {f}" for f in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", args)
                      if f not in verbs[verb]]
    known = set().union(*verbs.values()) | _script_flags() | set(FOREIGN_FLAGS)
    wrong += [f for f in re.findall(r"`(--[a-z][\w-]*[a-z])[ =`]", text) if f not in known]
    assert not wrong, f"{doc.name} uses flags that do not exist: {sorted(set(wrong))}"


def test_the_scanner_finds_a_stale_path_and_a_wrong_flag(tmp_path: Path) -> None:
    """The checks above can fail: a renamed file and a flag of another verb are caught."""
    doc = tmp_path / "x.md"
    doc.write_text("see `tests/serve/test_gone.py` and run `llava-edge run PKG --max-slots 4`\n")
    assert not _exists("tests/serve/test_gone.py", doc) and _exists("tests/serve/conftest.py", doc)
    assert _exists("benchmarks/kernels/bench_{decode_attention,int4_matmul}.py", doc)
    assert not _exists("benchmarks/kernels/bench_{decode_attention,nope}.py", doc)
    [(verb, args)] = _command_lines(doc.read_text())
    assert verb == "run" and "--max-slots" not in _verbs()["run"] and "--max-slots" in _verbs()["serve"]


def test_the_readme_says_what_the_browser_tests_need() -> None:
    text = (ROOT / "README.md").read_text()
    assert "chromium" in text.lower() and "playwright" in text.lower()


def test_every_extra_the_docs_install_exists() -> None:
    """`pip install -e ".[nope]"` only warns and installs without it: an extra the docs name must exist."""
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = {e.strip() for doc in DOCS for group in re.findall(r"(?:\.|llava-edge)\[([\w,\s-]+)\]", doc.read_text())
             for e in group.split(",")}
    assert "quickstart" in named and named <= extras, sorted(named - extras)
