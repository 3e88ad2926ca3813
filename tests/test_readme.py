"""The README as a new user reads it (issue 11): the install section says how to get PyTorch's CPU
build and which extra each use needs, a missing library names its extra, and every code block of
the journey (up to "Lambda within a run") runs as written in a fresh directory, the shell lines
through the installed console script. The sections after it (schedules, distributed training, the
Trainer and Lightning callbacks, precision, PEFT) show fragments of a larger program; their own
tests run them (test_schedule.py, test_distributed.py, test_hf.py, test_lightning.py,
test_precision.py, test_peft.py)."""
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import dgating_surgery as dg
from dgating_surgery.cli import main

from test_cli import shell

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
JOURNEY = README.split("## Lambda within a run")[0]


def blocks():
    """(language, code) of every fenced block of the journey, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", JOURNEY, re.S | re.M)]


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
    # the CPU build, within the versions the package allows (else pip would fetch the CUDA build again)
    assert (f"pip install 'torch<={top['torch']}' 'torchvision<={top['torchvision']}' "
            '--index-url "$PYTORCH_CPU_INDEX"') in install and "CPU" in install
    named = set(re.findall(r"\.\[(\w+)\]", README))
    assert {"vision", "timm", "transformers", "onnx", "test", "bench"} <= named <= set(extras())
    for library, extra in (("torchvision", "vision"), ("timm", "timm"), ("transformers", "transformers")):
        assert any(library in row and f".[{extra}]" in row for row in install.splitlines()), library
        assert any(library in dep for dep in extras()[extra])
    cli_section = README.split("## The command line")[1].split("\n## ")[0]
    assert "These examples use torchvision's models: `pip install '.[vision]'`" in cli_section


def test_a_missing_library_names_its_extra(monkeypatch, tmp_path):
    for name in ("torchvision", "torchvision.models"):
        monkeypatch.setitem(sys.modules, name, None)  # as on a base install
    result = CliRunner().invoke(main, ["convert", "torchvision.models:resnet18", "-o", str(tmp_path / "g.safetensors")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "install torchvision (pip install torchvision, or this package's 'vision' extra: pip install '.[vision]')" \
        in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_readme_examples_run_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torchvision")
    pytest.importorskip("onnx")
    monkeypatch.chdir(tmp_path)
    kinds = []
    for lang, code in blocks():
        if lang == "python":
            exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
        elif lang == "yaml":
            assert dg.load_recipe(yaml.safe_load(code)).groups
        elif lang == "bash":
            for line in code.splitlines():
                words = shlex.split(line, comments=True)
                commands = [[]]
                for word in words:
                    commands.append([]) if word == "&&" else commands[-1].append(word)
                for command in commands:
                    if not command or command[:2] == ["pip", "install"] or command[:3] == ["python", "-m", "pytest"]:
                        continue
                    assert command[0] == "dgate", line
                    done = shell(*command[1:], cwd=tmp_path)
                    assert done.returncode == 0, f"{line}\n{done.stderr}"
        kinds.append(lang)
    assert kinds.count("python") >= 4 and kinds.count("bash") >= 4 and "yaml" in kinds
    for name in ("gated.safetensors", "slim.safetensors", "slim.onnx"):
        assert (tmp_path / name).is_file(), name
