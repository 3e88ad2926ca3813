"""The size-target benchmarks run end to end on a few steps: every method lands on the size asked,
the tables print, and the plots are PNG files (benchmarks/plots.py, directly and from JSON)."""
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

PNG = b"\x89PNG\r\n\x1a\n"


def test_wine_one_cell_every_method_at_k_features(tmp_path, capsys, one_thread):
    pytest.importorskip("sklearn")
    import paper_target_wine
    import plots

    rows_json, png = tmp_path / "wine.json", tmp_path / "wine.png"
    paper_target_wine.main(["--seeds", "0", "--steps", "5", "--kept", "4", "--no-gap", "--json", str(rows_json)])
    out = capsys.readouterr().out
    assert "Runs that did not end at exactly k features: none" in out
    row = next(line for line in out.splitlines() if line.startswith("| 4 | "))
    assert len(row.split("|")) == 2 + 1 + len(paper_target_wine.METHODS) + 1  # k, every method, scratch
    data = json.loads(rows_json.read_text())
    assert {r["method"] for r in data["rows"]} == {"dense", "scratch", *paper_target_wine.METHODS}
    assert {r["x"] for r in data["rows"] if r["method"] != "dense"} == {4}
    pytest.importorskip("matplotlib")
    plots.main([str(rows_json), str(png)])
    assert png.read_bytes()[:8] == PNG


def test_gpt2_one_cell_lands_on_the_per_kind_sizes(tmp_path, capsys, one_thread):
    pytest.importorskip("transformers")
    import paper_target_gpt2

    png = tmp_path / "gpt2.png"
    paper_target_gpt2.main(["--seeds", "0", "--steps", "5", "--heads", "0.5", "--neurons", "0.25",
                            "--val-windows", "8", "--plot", str(png), "--rows", str(tmp_path / "rows.json")])
    out = capsys.readouterr().out
    # 8 of 16 heads and 256 of 1024 neurons for both methods: D-Gating by its per-kind targets,
    # magnitude by the same fraction in every layer
    assert re.search(r"\| 50% \| 25% \| [^|]+ \| [^|]+ \| [^|]+ \| [01] / 1 \| 8, 256; 8, 256 \|", out), out
    # magnitude with D-Gating's counts per layer lands on D-Gating's size exactly
    rows = json.loads((tmp_path / "rows.json").read_text())
    dgr, = (r for r in rows if r["method"] == "D-Gating target")
    lay, = (r for r in rows if r["method"] == "magnitude, D-Gating's layers")
    assert (lay["heads"], lay["neurons"], lay["params"]) == (dgr["heads"], dgr["neurons"], dgr["params"])
    pytest.importorskip("matplotlib")  # the table is checked above; the plot needs the bench extra
    assert png.read_bytes()[:8] == PNG


def test_paper_target_rows_table_merge_and_plot(tmp_path, capsys, one_thread):
    """paper_target.py on a few steps: every method lands on the size asked, the rows it saves
    print the same table with --merge, and the plot of accuracy against size kept is a PNG."""
    pytest.importorskip("sklearn")
    import paper_target

    rows_json, png = tmp_path / "mlp.json", tmp_path / "mlp.png"
    paper_target.main(["--steps", "8", "--seeds", "0", "--kept", "0.25", "--rows", str(rows_json)])
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("| 25% | "))
    kept = [float(k) for k in re.findall(r"\(([\d.]+)% kept\)", row)]
    assert len(kept) == len(paper_target.METHODS) and all(abs(k - 25) <= 3 for k in kept), row
    rows = json.loads(rows_json.read_text())
    assert sorted(r["method"] for r in rows) == sorted(["dense", *paper_target.METHODS])
    assert all(r["steps"] == 8 and r["seed"] == 0 for r in rows)
    paper_target.main(["--merge", str(rows_json), "--plot", str(png)])
    merged = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("|", "Dense", "D-Gating"))]
    assert merged == [line for line in table.splitlines() if line.startswith(("|", "Dense", "D-Gating"))]
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == PNG


def test_lm_target_every_method_lands_on_the_same_size(capsys, one_thread):
    pytest.importorskip("transformers")
    import paper_target_lm

    paper_target_lm.main(["--steps", "8", "--seeds", "0", "--split", "val",
                          "--methods", "D-Gating", "D-Gating, no recovery", "magnitude", "magnitude, D-Gating's layers",
                          "scratch"])
    out = capsys.readouterr().out
    # half the heads' and 70% of the neurons' parameters gone: 48.1% of the model kept, whoever cut it
    for method in ("D-Gating", "D-Gating, no recovery", "magnitude", "magnitude, D-Gating's layers", "scratch"):
        assert re.search(rf"\| {method} \| [\d.]+ ± 0\.000 \| 48\.1% \| ", out), (method, out)
    assert re.search(r"\| magnitude \| [\d.]+ ± 0\.000 \| 48\.1% \| 0\.000 ± 0\.000 \| 0 / 1 \|", out), out


def test_gpt2_magnitude_cells_do_not_share_adam_state(monkeypatch, one_thread):
    """Every cell fine-tunes a copy of the dense run with a copy of its Adam state: a cell's result
    does not depend on which cells ran before it (load_state_dict keeps the very moment tensors)."""
    pytest.importorskip("transformers")
    import paper_target_gpt2 as G
    from paper_heads_gpt2 import load_bytes, val_windows

    monkeypatch.setattr(G, "STEPS", 8)
    train_bytes, val_bytes, _ = load_bytes()
    val = val_windows(val_bytes, 8)
    example = val[:2, :-1]
    after_another = G.magnitude(train_bytes[:200_000], val, example, [(0.5, 0.5), (0.25, 0.25)], 0)
    alone = G.magnitude(train_bytes[:200_000], val, example, [(0.25, 0.25)], 0)
    cell = ("magnitude uniform", (0.25, 0.25))
    assert after_another[cell]["loss"] == alone[cell]["loss"]
    assert after_another["dense", None]["loss"] == alone["dense", None]["loss"]
