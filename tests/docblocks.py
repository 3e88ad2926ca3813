"""The code blocks of README.md and docs/, and how the tests run them.

Every ```python and ```bash block says what it is in an HTML comment on the line before it (a
reader sees nothing of it, on GitHub or in the built site):

- ``<!-- test: run -->``: a complete program. The blocks of a page marked so run in page order in
  one fresh directory (a later block may read the files an earlier one wrote);
- ``<!-- test: journey cnn -->`` (or ``lm``): a step of a journey a new user walks: README's quick
  start, then the pages of docs/ in the site's order, all in one directory (tests/test_docs.py);
- ``<!-- test: fragment tests/test_x.py -->``: part of a larger program (it names the test that
  runs the whole), or a sketch with names the reader fills in;
- ``<!-- test: install -->``: a pip command (tests/test_readme.py checks the install section);
- ``<!-- test: benchmark -->``: commands that reproduce figures: each script must exist.

Python runs in-process (``exec``); a bash line runs through the installed ``dgate`` script; pip
and pytest lines are not run (the environment that runs the tests is the one they install).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

import dgating_surgery as dg

from test_cli import shell

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CODE = ("python", "bash")
BLOCK = re.compile(r"^(?:<!-- test: (?P<mark>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)^```", re.S | re.M)


@dataclass
class Block:
    page: str  # relative to the repository root
    line: int
    lang: str
    mark: str  # "" when the block carries no marker
    code: str

    @property
    def kind(self) -> str:
        return self.mark.split()[0] if self.mark else ""

    @property
    def arg(self) -> str:
        return self.mark.partition(" ")[2]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with its marker."""
    text = path.read_text()
    page = str(path.relative_to(ROOT))
    return [Block(page, text.count("\n", 0, m.start()) + 1, m.group("lang"), m.group("mark") or "", m.group("code"))
            for m in BLOCK.finditer(text)]


def nav_pages() -> list[Path]:
    """The pages of docs/ in the order of the site's navigation (mkdocs.yml)."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = []

    def walk(items):
        for item in items:
            value = item if isinstance(item, str) else next(iter(item.values()))
            walk(value) if isinstance(value, list) else pages.append(DOCS / value)
    walk(config["nav"])
    return pages


def all_pages() -> list[Path]:
    return [ROOT / "README.md", *nav_pages()]


def journey(name: str) -> list[Block]:
    """The steps of a journey: README first, then the docs in the site's order."""
    return [b for page in all_pages() for b in blocks(page) if b.kind == "journey" and b.arg == name]


def run(steps: list[Block], where: Path) -> dict[str, dict]:
    """Run blocks in order in ``where`` (the current directory, which the caller has moved to).
    Python shares one namespace per page, as a reader runs a page's program top to bottom; files
    carry over from page to page. Returns page -> the namespace its Python left."""
    assert Path.cwd() == where
    spaces: dict[str, dict] = {}
    for block in steps:
        if block.lang == "python":
            namespace = spaces.setdefault(block.page, {"__name__": "__docs__"})
            exec(compile(block.code, str(block), "exec"), namespace)
        elif block.lang == "bash":
            run_bash(block, where)
        elif block.lang == "yaml":
            assert dg.load_recipe(yaml.safe_load(block.code)).groups, block
    return spaces


def run_bash(block: Block, where: Path) -> None:
    for line in block.code.splitlines():
        commands = [[]]
        for word in shlex.split(line, comments=True):
            commands.append([]) if word == "&&" else commands[-1].append(word)
        for command in commands:
            if not command or command[:2] == ["pip", "install"] or command[:3] == ["python", "-m", "pytest"]:
                continue
            assert command[0] == "dgate", f"{block}: only dgate commands run in tests: {line}"
            done = shell(*command[1:], cwd=where)
            assert done.returncode == 0, f"{block}: {line}\n{done.stderr}"


def benchmark_scripts(block: Block) -> list[str]:
    """The scripts a benchmark block runs (``python benchmarks/x.py ...``)."""
    return [w for line in block.code.splitlines() for w in shlex.split(line, comments=True) if w.endswith(".py")]

