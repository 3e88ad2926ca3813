"""Plots for the size-target benchmarks: the figure of merit (accuracy, loss) against the size kept
(parameters, MACs, features), one line per method, the mean over seeds with the seeds' standard
deviation as error bars.

A benchmark passes rows ``{"method": str, "x": size kept, "y": figure, "seed": int}`` (optionally
``"setting"``: the size asked, when the size reached varies by seed) to ``plot``, or writes them
with ``write_json`` and plots later:

    python benchmarks/plots.py rows.json docs/img/figure.png

A JSON file is ``{"rows": [...], "xlabel": ..., "ylabel": ..., "title": ..., "hline": ...}``
(``hline``: a method drawn as a horizontal line at its mean, e.g. the dense model).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def _series(rows, method) -> list[tuple[float, float, float]]:
    """(mean x, mean y, std y over seeds) per setting of one method (a row's ``setting``, else its
    x: sizes reached within a group of the target still make one point), sorted by x."""
    by_setting: dict[object, list[dict]] = {}
    for r in rows:
        if r["method"] == method:
            by_setting.setdefault(r.get("setting", r["x"]), []).append(r)
    points = []
    for sel in by_setting.values():
        ys = [r["y"] for r in sel]
        points.append((statistics.mean(r["x"] for r in sel), statistics.mean(ys),
                       statistics.stdev(ys) if len(ys) > 1 else 0.0))
    return sorted(points)


def plot(rows, path, xlabel, ylabel, title="", hline=None, logx=False, spread=0.006) -> None:
    """Write a PNG of ``rows`` to ``path`` (matplotlib, the ``bench`` extra; a note without it).
    ``spread``: methods at the same x are drawn this fraction of the x range apart (with ``logx``:
    this fraction of x), so that their error bars do not hide each other; with ``logx`` the ticks
    are the rows' ``setting`` values where they are numbers, else the first method's sizes."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: pip install '.[bench]' for the plot)")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [m for m in methods if m != hline]
    width = spread * ((max(r["x"] for r in rows) - min(r["x"] for r in rows)) or 1.0)
    for i, method in enumerate(methods):
        series = _series(rows, method)
        if method == hline:
            ax.axhline(statistics.mean(y for _, y, _ in series), color="gray", linestyle=":", label=method)
            continue
        xs, ys, sd = zip(*series)
        offset = lines.index(method) - (len(lines) - 1) / 2
        xs = [x * (1 + offset * spread) if logx else x + offset * width for x in xs]
        dashed = "no recovery" in method or "scratch" in method
        ax.errorbar(xs, ys, yerr=sd, marker="o", ms=4, capsize=3, label=method, linestyle="--" if dashed else "-",
                    color=f"C{i}")
    if logx:
        ax.set_xscale("log")
        settings = {r.get("setting") for r in rows if r["method"] in lines}
        ticks = sorted(settings) if all(isinstance(t, (int, float)) for t in settings) else sorted(
            {float(f"{x:.2g}") for x, _, _ in _series(rows, lines[0])})  # the sizes asked, else the first method's
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


def write_json(rows, path, **labels) -> None:
    """Save rows and the plot's labels (``xlabel``, ``ylabel``, ``title``, ``hline``, ``logx``)."""
    with open(path, "w") as fh:
        json.dump({"rows": rows, **labels}, fh, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="rows written by a benchmark (write_json)")
    parser.add_argument("png", help="the PNG to write")
    args = parser.parse_args(argv)
    with open(args.json) as fh:
        data = json.load(fh)
    rows = data.pop("rows")
    plot(rows, args.png, data.pop("xlabel", "size kept"), data.pop("ylabel", "figure of merit"), **data)


if __name__ == "__main__":
    sys.exit(main())
