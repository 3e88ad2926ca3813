"""``dgate demo``: the whole journey on a built-in model."""
from __future__ import annotations

import click

from .common import main, NonNegative


@main.command(short_help="The whole journey on a built-in model (~10 s).")
@click.option("--out", type=click.Path(file_okay=False), help="Keep the slim checkpoint in this directory "
              "(default: a temporary one).")
@click.option("--epochs", default=100, show_default=True, type=click.IntRange(1))
@click.option("--lam", default=7e-3, show_default=True, type=NonNegative("--lam"), help="D-Gating strength.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--target", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Ask for a size instead of a lambda: the fraction of --metric the cut removes (e.g. 0.9), reached "
                   "within the run (dense quarter, penalty, then recovery with the chosen groups held at zero).")
@click.option("--metric", type=click.Choice(["params", "macs", "groups"]), default="params", show_default=True,
              help="What --target counts.")
def demo(out, epochs, lam, seed, target, metric):
    """The whole journey on a built-in model and scikit-learn's digits: gate, train (progress
    bar), report, cut, save, reload, check; ends with a before/after table (about 10 s)."""
    from ..demo import run_demo
    run_demo(out, epochs, lam, seed, target=target, metric=metric)
