"""Assign every minimized failure (from minimize_all.py) to a root-cause class of FUZZ_REPORT.md:
block keywords of the minimal case first, then a plan check for the two input-feature classes.
MANUAL holds the few seeds of the 40000-seed run the rules could not place (checked by hand).

    PYTHONPATH=. python benchmarks/fuzz_tools/classify.py min_all.json
"""
import sys, json, re, collections, torch, warnings
import os; sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests")); import random_arch as R, dgating_surgery as dg
warnings.simplefilter("ignore"); torch.set_num_threads(1)

def input_positions_multi(rec):
    spec = R.make_spec(rec["seed"])
    model, inputs, desc = R.build(spec, frozenset(rec["skip"]))
    from dgating_surgery.tracing import capture
    from dgating_surgery.groups import Analysis
    a = Analysis(capture(model, inputs)); plan = a.run()
    for space in a.spaces:
        if space.kind == "features":
            roots = plan.root_of[space.start: space.start + space.size]
            c = collections.Counter(roots.tolist())
            for s in plan.sets:
                if s.kind == "features" and s.removable.any():
                    if any(c[int(r)] > 1 for r, ok in zip(s.roots, s.removable) if ok):
                        return True
    return False

def mixed_set(rec):
    spec = R.make_spec(rec["seed"])
    model, inputs, desc = R.build(spec, frozenset(rec["skip"]))
    plan = dg.analyze(model, inputs)
    return any(s.kind != "features" and "x" in s.modules and s.removable.any() for s in plan.sets)

MANUAL = {4592: "C5 full-size ungrouped operand", 20543: "C5 full-size ungrouped operand",
          27915: "C5 full-size ungrouped operand", 37210: "C5 full-size ungrouped operand",
          38187: "C5 full-size ungrouped operand", 33264: "C5 full-size ungrouped operand",
          16723: "C2 stack/cat raw ids", 34595: "C2 stack/cat raw ids", 33431: "C10 export literal sizes"}

def classify(r):
    if r["seed"] in MANUAL: return MANUAL[r["seed"]]
    d, det, st = r["min_desc"] or r["desc"], (r["min_detail"] or r["detail"]), (r["min_stage"] or r["stage"])
    if "two gates at once" in det: return "C1 module called twice"
    if "shared layer again" in d and st == "run slim": return "C1b shared layer, other call unlabelled"
    if "stack2" in d: return "C2 stack/cat raw ids"
    if re.search(r"convT\dd\([^)]*,g([2-9]|1\d)\)", d) and st == "gate_model": return "C6 grouped ConvTranspose"
    if "PReLU(num_parameters" in d: return "C7 PReLU(C)"
    if " of p" in d or " of h" in d: return "C8 view_as other"
    if re.search(r"F\.conv\dd\([^)]*,g([2-9]|1\d)\)", d): return "C9 functional grouped conv"
    if "[excl 0]" in d: return "W1 clamp bounds"
    if "sizedata[" in d: return "W2 size as data"
    if "compare[" in d: return "W3 comparison/mask"
    if st == "stale shape attribute" or st == "slim model warns": return "W5 stale num_features"
    if "InstanceNorm" in d and "affine=False,track=True" in d and (r["min_kind"] or r["outcome"]) == "wrong": return "W4 InstanceNorm tracked stats"
    if "inplace[" in d: return "W6 in-place"
    if re.search(r"ConstantPad2d\(1,(0\.5|-1\.0)\)", d): return "W7 ConstantPad value"
    if re.search(r"buffer|ones_like|cumsum|erfinv|logcumsumexp|h[-+*/]x\b|cat x|zeros_like|full_like|new_ones", d):
        return "C5 full-size ungrouped operand"
    try:
        if mixed_set(r): return "C3 input features in a channels set"
        if input_positions_multi(r): return "C4 feature group spans positions"
    except Exception as e:
        return "?? " + str(e)[:60]
    if re.search(r"F\.glu|[Pp]ixel_?[Uu]n?[Ss]huffle|F\.pad|repeat_interleave|masked_fill|where|normalize|norm|attention|StdConv|F\.prelu", d):
        return "C5 full-size ungrouped operand"
    return "?? unclassified"

recs = json.load(open(sys.argv[1]))
by = collections.defaultdict(list)
for r in recs:
    by[classify(r)].append(r)
for k, v in sorted(by.items()):
    kinds = collections.Counter(x["min_kind"] or x["outcome"] for x in v)
    print(f"\n## {k}: {len(v)} {dict(kinds)}")
    print("   seeds:", ", ".join(str(x["seed"]) for x in v[:14]))
    json.dump({k: [x["seed"] for x in v] for k, v in by.items()}, open(sys.argv[1] + ".classes.json", "w"))
    sm = min(v, key=lambda x: len(x["min_desc"] or x["desc"]))
    print("   smallest:", sm["seed"], sm["min_desc"], "->", sm["min_kind"], sm["min_stage"], (sm["min_detail"] or "")[:150])
    if k.startswith("??"):
        for x in v[:10]: print("     ", x["seed"], x["min_desc"], "|", (x["min_detail"] or "")[:120])
