"""Minimize every wrong/crash seed of a fuzz.py --json file (seeds in [lo, hi)); save the minimal cases.

    PYTHONPATH=. python benchmarks/fuzz_tools/minimize_all.py final.json 0 40000 min_all.json
"""
import sys, json, torch, warnings, time
import os; sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests")); import random_arch as R
warnings.simplefilter("ignore"); torch.set_num_threads(1)
recs = json.load(open(sys.argv[1])); lo, hi = int(sys.argv[2]), int(sys.argv[3])
out = []
t = time.time()
for r in recs:
    if not (lo <= r["seed"] < hi) or r["outcome"] not in ("wrong", "crash"): continue
    try:
        res = R.minimize(r["seed"])
    except Exception as e:
        print("fail", r["seed"], e, file=sys.stderr); continue
    o, desc, spec, skip = res
    out.append({**r, "min_desc": desc, "min_kind": o.kind if o else None, "min_stage": o.stage if o else None,
                "min_detail": o.detail if o else None, "skip": sorted(skip)})
json.dump(out, open(sys.argv[4], "w"))
print(len(out), "minimized in", time.time() - t, file=sys.stderr)
