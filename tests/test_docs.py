"""The documentation as a new user reads it (issue 21): docs/ builds with mkdocs in strict mode (no
broken link or anchor, every page in the navigation), every code block says whether it runs, and
what runs does run as written: the two journeys (a torchvision CNN at a small input, a tiny Llama),
each from README's quick start through the pages of docs/, in one directory, and every page's own
complete programs. See docblocks.py for the markers."""
import json
import re
import subprocess
import sys

import pytest
import torch

import dgating_surgery as dg

from docblocks import CODE, DOCS, ROOT, all_pages, benchmark_scripts, blocks, journey, nav_pages, run

KINDS = {"run", "journey", "fragment", "install", "benchmark"}


def test_mkdocs_build_is_strict_clean(tmp_path):
    """Broken links and anchors, pages missing from the navigation and unknown files are warnings,
    which --strict turns into a failed build."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                           "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {p.stem for p in (tmp_path / "site").glob("*.html")} >= {p.stem for p in nav_pages()}


def test_every_page_is_in_the_navigation():
    assert sorted(DOCS.glob("*.md")) == sorted(nav_pages())


def test_every_code_block_says_what_it_is():
    for page in all_pages():
        for block in blocks(page):
            if block.lang in CODE:
                assert block.kind in KINDS, f"{block}: a {block.lang} block needs <!-- test: run|journey|fragment ... -->"
            if block.kind == "journey":
                assert block.arg in ("cnn", "lm"), block
            if block.kind == "fragment":
                named = block.arg.split()[0] if block.arg else ""
                assert named.startswith("tests/") and (ROOT / named).is_file(), \
                    f"{block}: a fragment names the test that runs its program (tests/test_x.py)"
            if block.kind == "benchmark":
                scripts = benchmark_scripts(block)
                assert scripts and all((ROOT / s).is_file() for s in scripts), f"{block}: {scripts}"


def test_every_result_names_the_command_that_produced_it():
    """Every section of results.md that shows figures carries the command that reproduces them."""
    sections = (DOCS / "results.md").read_text().split("\n## ")[1:]
    assert len(sections) >= 10
    for section in sections:
        figures = re.search(r"^\|.*\d.*\|$|^```text", section, re.M)
        assert not figures or "<!-- test: benchmark -->" in section, section.splitlines()[0]


def test_readme_links_into_docs_resolve():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", readme)
    assert targets and all((ROOT / t).is_file() for t in targets), targets


def page_programs():
    return [page for page in nav_pages() if any(b.kind == "run" for b in blocks(page))]


@pytest.mark.parametrize("page", page_programs(), ids=lambda p: p.name)
def test_page_programs_run_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run([b for b in blocks(page) if b.kind == "run"], tmp_path)


def test_cnn_journey(tmp_path, monkeypatch):
    """README's CNN quick start (a ResNet-18 at 32x32, a size target of half the parameters), then
    deployment (the saved file reloaded and exported) and the command line (convert, train in
    Python, report, shrink with an ONNX export)."""
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("onnx")
    monkeypatch.chdir(tmp_path)
    steps = journey("cnn")
    assert [b.page for b in steps][0] == "README.md" and {"docs/cli.md", "docs/deployment.md"} <= {b.page for b in steps}
    spaces = run(steps, tmp_path)
    quick = spaces["README.md"]
    dense = dg.model_params(torchvision.models.resnet18())
    assert abs(dg.model_params(quick["again"]) / dense - 0.5) < 0.01  # the size asked for, to a group
    with torch.no_grad():
        assert dg.max_rel_diff(quick["before"], quick["again"](quick["images"])) < 1e-4
    for name in ("resnet18-slim.safetensors", "resnet18-slim.pt2", "gated.safetensors", "slim.safetensors", "slim.onnx"):
        assert (tmp_path / name).is_file(), name


def test_language_model_journey(tmp_path, monkeypatch):
    """README's language-model quick start (a tiny Llama: recipe, param_groups, a size target,
    shrink, save_pretrained and save_slim, loaded back, generate), then the Trainer, gated
    checkpoints, uniform widths and a command-line checkpoint turned into a Hugging Face directory."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    steps = journey("lm")
    assert [b.page for b in steps][0] == "README.md"
    spaces = run(steps, tmp_path)
    quick = spaces["README.md"]
    slim, again, same, ids = quick["slim"], quick["again"], quick["same"], quick["ids"]
    dense = dg.model_params(transformers.LlamaForCausalLM(transformers.LlamaConfig(  # as README's, before the cut
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128)))
    assert abs(dg.model_params(slim) / dense - 0.5) < 0.01
    with torch.no_grad():
        reference = slim(ids).logits
        for loaded in (again, same):
            assert type(loaded) is transformers.LlamaForCausalLM
            assert dg.max_rel_diff(reference, loaded(ids).logits) < 1e-5
    prompt = ids[:1, :10]
    tokens = slim.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(tokens, again.generate(prompt, max_new_tokens=10, do_sample=False))
    assert torch.equal(tokens, same.generate(prompt, max_new_tokens=10, do_sample=False))
    # the pages after it: the uniform directory states its widths in plain config fields
    assert "dgating_surgery" not in json.loads((tmp_path / "llama-uniform" / "config.json").read_text())
    for name in ("llama-trained-slim", "llama-gated", "llama-cli-slim", "trainer-out/checkpoint-20"):
        assert (tmp_path / name).is_dir(), name

