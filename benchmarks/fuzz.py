"""Random-architecture fuzzing of the core invariant (gate -> kill groups -> shrink == gated).

Runs ``tests/random_arch.py``'s cases for seeds S .. S+N-1 and prints the count of every outcome
(exact, nothing gated, refused, wrong, crash, invalid) and, for wrong and crash, the seeds and a
one-line detail grouped by failure class (outcome, stage and message with numbers blurred).

    PYTHONPATH=. python benchmarks/fuzz.py 3000
    PYTHONPATH=. python benchmarks/fuzz.py 500 --start 20000 --minimize 2   # shrink 2 cases per class
    PYTHONPATH=. python benchmarks/fuzz.py 3000 --by-culprit                 # minimize every failure and
                                                                            # group by the blocks left

``--minimize K`` drops blocks of the first K seeds of each class while they fail the same way and
prints what is left; ``--by-culprit`` does that for every failing seed and groups the failures by
the minimal block list (slower, but separates root causes that share a message). ``--refused``
also lists the refusals; ``--reasons`` tallies why groups were not gated (the tool's own reasons).
Refusals by shrink's own check (a slim model that does not run: the engine's plan missed a tie,
e.g. a size torch.export wrote as a number; no wrong result) are always listed.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import random_arch as R  # noqa: E402

ORDER = ["exact", "nothing gated", "refused", "wrong", "crash", "invalid"]


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def warm_up() -> None:
    """Import and run torch.export once outside the per-case timer: its first use imports
    torch._dynamo, which under load takes longer than a case may."""
    torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), strict=False)


def run_one(seed: int, deep: bool, limit: int):
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        return R.run_seed(seed, deep=deep)
    except _Timeout:
        return R.Outcome("crash", f"case took more than {limit} s", "timeout"), "?"
    except Exception as exc:  # noqa: BLE001 - a generator bug must not end the sweep
        return R.Outcome("harness", f"{type(exc).__name__}: {exc}"[:200], "generator"), "?"
    finally:
        signal.alarm(0)


def _minimize(seed: int):
    try:
        return R.minimize(seed)
    except Exception as exc:  # noqa: BLE001 - a harness problem must not lose the report
        print(f"    (minimizing seed {seed} failed: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def signature(desc: str) -> str:
    """A minimal case's block list with sizes blurred: the failure's culprit, roughly."""
    parts = desc.split(" > ")[1:]
    parts = [re.sub(r"-?\d+(\.\d+)?", "N", p) for p in parts]
    return " > ".join(parts)


def not_gated_reasons(model, inputs) -> set[str]:
    import dgating_surgery as dg
    plan = dg.analyze(model, inputs)
    out = set()
    for s in plan.sets:
        for r in s.reasons:
            if r and "reaches the model output" not in r:
                r = re.sub(r"'[^']*'", "*", re.sub(r"\d+", "N", r))
                out.add(r[:140])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int, help="number of seeds")
    ap.add_argument("--start", type=int, default=0, help="first seed")
    ap.add_argument("--minimize", type=int, default=0, metavar="K", help="minimize the first K seeds of each class")
    ap.add_argument("--by-culprit", action="store_true", help="minimize every failure, group by the blocks left")
    ap.add_argument("--refused", action="store_true", help="list refusals by class too")
    ap.add_argument("--reasons", action="store_true", help="tally the tool's reasons for groups not gated")
    ap.add_argument("--shallow", action="store_true", help="skip the dead-entry (gradient) check")
    ap.add_argument("--seeds-shown", type=int, default=12, help="seeds listed per class")
    ap.add_argument("--limit", type=int, default=30, help="seconds per case before it counts as a crash")
    ap.add_argument("--json", help="write every non-exact outcome to this file")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    warm_up()
    counts = collections.Counter()
    classes: dict[str, list] = collections.defaultdict(list)
    reasons = collections.Counter()
    records = []
    t0 = time.perf_counter()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # `timeout` ends the sweep early, with a report
    done = 0
    for i, seed in enumerate(range(args.start, args.start + args.n)):
        if stop:
            print(f"stopped by SIGTERM after {done} seeds", file=sys.stderr)
            break
        outcome, desc = run_one(seed, not args.shallow, args.limit)
        done += 1
        counts[outcome.kind] += 1
        if (outcome.kind in ("wrong", "crash", "harness") or (args.refused and outcome.kind == "refused")
                or outcome.stage == "shrink check"):
            classes[R.failure_key(outcome)].append((seed, outcome.detail, desc))
        if outcome.kind != "exact":
            records.append({"seed": seed, "outcome": outcome.kind, "stage": outcome.stage, "detail": outcome.detail,
                            "desc": desc})
        if args.reasons:
            model, inputs, _ = R.make_case(seed)
            for r in not_gated_reasons(model, inputs):
                reasons[r] += 1
        if (i + 1) % 500 == 0:
            el = time.perf_counter() - t0
            print(f"... {i + 1} seeds, {el:.0f} s, {(i + 1) / el:.1f} cases/s, "
                  + ", ".join(f"{k}: {counts[k]}" for k in ORDER + ["harness"] if counts[k]), file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t0
    args.n = done
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f)

    print(f"seeds {args.start}..{args.start + args.n - 1}: {args.n} cases in {elapsed:.0f} s "
          f"({args.n / elapsed:.1f} cases/s)\n")
    print(f"{'outcome':15s} {'cases':>7s} {'share':>7s}")
    for k in ORDER + (["harness"] if counts["harness"] else []):
        print(f"{k:15s} {counts[k]:7d} {100 * counts[k] / max(1, args.n):6.1f}%")

    if classes:
        print("\nFailure classes (outcome | stage | message), most frequent first:")
    for key, items in sorted(classes.items(), key=lambda kv: -len(kv[1])):
        seeds = [s for s, _, _ in items]
        shown = ", ".join(map(str, seeds[: args.seeds_shown])) + (" ..." if len(seeds) > args.seeds_shown else "")
        print(f"\n[{len(items)}] {key}")
        print(f"    seeds: {shown}")
        seed, detail, desc = items[0]
        print(f"    e.g. seed {seed}: {detail[:200]}")
        print(f"         {desc[:300]}")
        for seed, _, _ in items[: args.minimize]:
            res = _minimize(seed)
            if res and res[0] is not None:
                print(f"    minimal (seed {seed}): {res[1][:300]}  ->  {res[0].kind}: {res[0].detail[:120]}")

    if args.by_culprit and classes:
        print("\nFailures by culprit (every failing seed minimized; the blocks left, sizes blurred):")
        culprits: dict[str, list] = collections.defaultdict(list)
        for key, items in classes.items():
            for seed, _, _ in items:
                res = _minimize(seed)
                if not res or res[0] is None:
                    continue
                culprits[f"{res[0].kind} | {signature(res[1])}"].append((seed, res[1], res[0]))
        for sig, items in sorted(culprits.items(), key=lambda kv: -len(kv[1])):
            seeds = [s for s, _, _ in items]
            print(f"\n[{len(items)}] {sig[:300]}")
            print(f"    seeds: {', '.join(map(str, seeds[: args.seeds_shown]))}{' ...' if len(seeds) > args.seeds_shown else ''}")
            seed, desc, out = min(items, key=lambda it: len(it[1]))
            print(f"    smallest (seed {seed}): {desc[:300]}")
            print(f"    {out.kind} [{out.stage}] {out.detail[:200]}")

    if args.reasons:
        print("\nWhy groups were not gated (cases where the reason occurs; output taint not counted):")
        for r, n in reasons.most_common(40):
            print(f"  {n:6d}  {r}")
    return 0 if not (counts["wrong"] or counts["crash"] or counts["harness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
