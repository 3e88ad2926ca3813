"""The README as a new user reads it (issues 11 and 21): the two commands for a fresh machine come
first, the install section says how to get PyTorch's CPU build and which extra each use needs, a
missing library names its extra, the page stays a front page (under 200 lines), and every code block
is one of the two commands, an install line or a step of a journey that tests/test_docs.py walks as
written (README's quick start, then the pages of docs/)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dgating_surgery.cli import main

from docblocks import CODE, blocks, journey

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TWO_COMMANDS = "pip install . && dgate demo\npip install -e '.[test]' && python -m pytest\n"


def extras() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("needs tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_install_section_names_the_cpu_build_and_the_extras():
    """Item 4: `pip install .` on a CPU-only machine pulled the CUDA build of torch (5.7 GB), and
    the CLI examples needed torchvision, which the base install lacks."""
    install = README.split("## Install")[1].split("\n## ")[0]
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    top = {re.match(r"[\w-]+", dep).group(0): re.search(r"<=([\d.]+)", dep).group(1)
           for dep in project["dependencies"] + extras()["vision"] if "<=" in dep}
    # the CPU build, within the versions the package allows (else pip would fetch the CUDA build again),
    # from an index the reader sets first: pasted unset, the shell stops with the instruction
    assert (f"pip install 'torch<={top['torch']}' 'torchvision<={top['torchvision']}' "
            '--index-url "${PYTORCH_CPU_INDEX:?') in install and "CPU" in install
    assert "Get Started" in install and "export PYTORCH_CPU_INDEX=" in install
    done = subprocess.run(["bash", "-c", 'unset PYTORCH_CPU_INDEX; echo --index-url "${PYTORCH_CPU_INDEX:?set it first: see Install}"'],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "set it first" in done.stderr
    assert not re.search(r"https?://|\.org\b|\.com\b", README), "no registry host or URL in the repository"
    named = set(re.findall(r"\.\[(\w+)\]", README))
    assert named == set(extras()), "every extra is in the install table, and nothing else"
    for library, extra in (("torchvision", "vision"), ("timm", "timm"), ("transformers", "transformers"),
                           ("Trainer", "hf"), ("Lightning", "lightning"), ("onnx", "onnx")):
        assert any(library in row and f".[{extra}]" in row for row in install.splitlines()), library
    for library, extra in (("torchvision", "vision"), ("timm", "timm"), ("transformers", "transformers"),
                           ("transformers", "hf"), ("lightning", "lightning"), ("onnx", "onnx")):
        assert any(library in dep for dep in extras()[extra]), extra


def test_the_front_page():
    """Short, the two commands at the very top (CI runs the second), the suite's time said, one demo
    time, and links into docs/ (tests/test_docs.py checks they resolve)."""
    assert len(README.splitlines()) < 200
    first = blocks(ROOT / "README.md")[0]
    assert first.code == TWO_COMMANDS and README.index("```bash") < README.index("\n## ")
    assert re.search(r"about \d+ minutes of CPU time \(the\s+user time of `time bash .ci/run`", README)
    assert "python -m pytest -m slow" in README
    demo = README.split("## The demo")[1].split("\n## ")[0]
    assert len(re.findall(r"\b\d+(?:\.\d+)? s\b", demo)) == 1 and "`time dgate demo`" in demo  # one time, measured
    assert "(docs/index.md)" in README


def test_every_readme_block_is_a_command_or_a_journey_step():
    code = [b for b in blocks(ROOT / "README.md") if b.lang in CODE]
    assert [b.kind for b in code] == ["install", "install", "journey", "journey"]
    assert [b.arg for b in code[2:]] == ["cnn", "lm"]
    for b in code[2:]:
        assert journey(b.arg)[0] == b  # the journey starts with README's quick start (tests/test_docs.py)


def test_a_missing_library_names_its_extra(monkeypatch, tmp_path):
    for name in ("torchvision", "torchvision.models"):
        monkeypatch.setitem(sys.modules, name, None)  # as on a base install
    result = CliRunner().invoke(main, ["convert", "torchvision.models:resnet18", "-o", str(tmp_path / "g.safetensors")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "install torchvision (pip install torchvision, or this package's 'vision' extra: pip install '.[vision]')" \
        in result.stderr
    assert list(tmp_path.iterdir()) == []
