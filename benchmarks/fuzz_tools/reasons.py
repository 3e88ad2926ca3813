"""Tally the tool's own reasons for groups not gated over seeds 0..N-1 (finds refusals of exact ops).

    PYTHONPATH=. python benchmarks/fuzz_tools/reasons.py 3000
"""
import sys, collections, torch, warnings, re
torch.set_num_threads(1)
import os; sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
import random_arch as R, dgating_surgery as dg
warnings.simplefilter("ignore")
reasons = collections.Counter(); ex = {}
N = int(sys.argv[1])
for seed in range(N):
    model, inputs, desc = R.make_case(seed)
    try: plan = dg.analyze(model, inputs)
    except Exception: continue
    rs = set()
    for s in plan.sets:
        for r in s.reasons:
            if r and "model output" not in r:
                m = re.search(r"(layer|function|method) '([^']*)'(?: \((\w+)\))?", r)
                op = (m.group(3) or m.group(2)) if m else ""
                op = re.sub(r"^(blocks|head)\.\d+\.", "", op)
                kind = re.sub(r"'[^']*'", "*", re.sub(r"\d+", "N", r))[:110]
                rs.add(f"{kind} || {op if 'no rule' in r or 'could not read' in r else ''}")
    for r in rs:
        reasons[r] += 1; ex.setdefault(r, seed)
for r, n in reasons.most_common(60): print(f"{n:5d} (e.g. seed {ex[r]:5d}) {r}")
