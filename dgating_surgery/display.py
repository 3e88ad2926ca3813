"""Rich renderings shared by the ``dgate`` commands and the demo. Integers are printed exactly
(with thousands separators), so that what a user reads is what the Python API returns."""
from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:  # importing them would import torch; `dgate --help` does without
    import torch

    from .engine.measure import LatencyComparison
    from .engine.report import SparsityReport


def console(stderr: bool = False) -> Console:
    """A console that keeps tables unwrapped when the output is not a terminal (pipes, tests)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 140, highlight=False)


def n(value: int) -> str:
    return f"{int(value):,}"


def groups(kind: str, count: int, per_group: int = 1) -> str:
    """A number of groups as a reader counts them: with grouped-query attention a heads group is a
    key/value head with the query heads it serves, so "2 kv groups (8 query heads)"."""
    if kind == "heads" and per_group > 1:
        return f"{n(count)} kv groups ({n(count * per_group)} query heads)"
    return n(count)


def pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def sparsity_table(report: SparsityReport, title: str = "D-Gating sparsity") -> Table:
    """One row per gate (kind, groups, alive, dead, parameters a cut removes) and the exact total."""
    table = Table(title=title, title_justify="left")
    for name, justify in (("gate", "left"), ("kind", "left"), ("groups", "right"), ("alive", "right"),
                          ("dead", "right"), ("params removable", "right")):
        table.add_column(name, justify=justify)
    for row in report.rows:
        table.add_row(row.label, row.kind, groups(row.kind, row.groups, row.per_group), n(row.alive), n(row.dead),
                      n(row.params_removable), style="dim" if row.dead == 0 else None)
    table.add_section()
    table.add_row("total", "", n(report.groups), n(report.groups - report.dead), n(report.dead),
                  f"{n(report.params_removable)} of {n(report.params_total)} "
                  f"({pct(report.params_removable, report.params_total)})", style="bold")
    return table


def histogram(norms: torch.Tensor, threshold: float, max_bins: int = 16) -> list[dict]:
    """Counts of group norms per power-of-ten bin (wider bins when the norms span many decades);
    a first bin holds exact zeros. Each bin: low, high, count, and whether it lies below the
    threshold ("dead"), above it ("alive"), or straddles it ("threshold")."""
    norms = norms.double()
    bins = []
    zeros = int((norms == 0).sum())
    if zeros:
        bins.append({"low": 0.0, "high": 0.0, "count": zeros, "side": "dead"})
    positive = norms[norms > 0]
    if positive.numel():
        lo = math.floor(math.log10(float(positive.min())))
        hi = math.floor(math.log10(float(positive.max()))) + 1
        step = max(1, math.ceil((hi - lo) / max_bins))
        logs = positive.log10()
        for k in range(lo, hi, step):
            count = int(((logs >= k) & (logs < k + step)).sum())
            low, high = 10.0 ** k, 10.0 ** (k + step)
            side = "dead" if high <= threshold else "alive" if low >= threshold else "threshold"
            bins.append({"low": low, "high": high, "count": count, "side": side})
    return bins


def histogram_table(bins: list[dict], threshold: float, width: int = 40) -> Table:
    table = Table(title=f"group norms (collapsed L2, threshold {threshold:g})", title_justify="left")
    table.add_column("norm", justify="right")
    table.add_column("groups", justify="right")
    table.add_column("", justify="left")
    top = max((b["count"] for b in bins), default=1) or 1
    colour = {"dead": "red", "alive": "green", "threshold": "yellow"}
    for b in bins:
        label = "0" if b["high"] == 0 else f"[{b['low']:.0e}, {b['high']:.0e})"
        bar = "█" * max(1 if b["count"] else 0, round(width * b["count"] / top))
        note = {"dead": " dead", "threshold": " <- threshold", "alive": ""}[b["side"]]
        table.add_row(label, n(b["count"]), f"[{colour[b['side']]}]{bar}[/]{note}")
    return table


def before_after_table(rows: list[tuple[str, str, str, str]], title: str) -> Table:
    """Rows of (metric, before, after, change)."""
    table = Table(title=title, title_justify="left")
    table.add_column("", justify="left")
    for name in ("before", "after", "change"):
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def ratio(before: float, after: float) -> str:
    if before == after:
        return "same"
    return f"{before / after:.2f}x smaller" if after and before >= after else (
        f"{after / before:.2f}x larger" if before else "-")


def speedup(before_ms: float, after_ms: float) -> str:
    """A ratio of two times, written the way it goes: "1.80x faster" or "1.30x slower"."""
    if not (before_ms > 0 and after_ms > 0):
        return "-"
    ratio = before_ms / after_ms
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def latency_change(cmp: "LatencyComparison") -> str:
    """"1.80x faster", "1.30x slower", or "within noise" when the rounds do not tell them apart."""
    if cmp.within_noise:
        return "within noise"
    if not (cmp.speedup > 0 and math.isfinite(cmp.speedup)):
        return "-"
    return f"{cmp.speedup:.2f}x faster" if cmp.speedup >= 1 else f"{1 / cmp.speedup:.2f}x slower"


def ms_spread(median: float, iqr: tuple[float, float]) -> str:
    """A median time with its interquartile range: "0.628 (0.611-0.650)"."""
    digits = 3 if median < 100 else 1
    return f"{median:.{digits}f} ({iqr[0]:.{digits}f}-{iqr[1]:.{digits}f})"
