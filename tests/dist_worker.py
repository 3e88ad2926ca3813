"""One rank of the distributed tests (tests/test_distributed.py starts two of them with gloo on
CPU): the same training as a one-process run on the whole batch, under DDP and under FSDP2, and
the cut after it. Also importable: the test runs the one-process references with these functions.

    python tests/dist_worker.py RANK WORLD STORE_FILE OUT_FILE
"""
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dgating_surgery as dg  # noqa: E402
from models import MLP  # noqa: E402

LAM, WD, LR, STEPS, THRESHOLD = 0.03, 1e-3, 0.2, 100, 1e-4
AFTER_STEPS = 5  # training steps after the cut, with the slim model wrapped again
RECIPE = {"D": 3, "groups": [{"kind": "neurons"}]}


def data(n=256, seed=0):
    """5 classes that depend on the first 3 of 10 features: most neurons are superfluous."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 10, generator=gen)
    y = (X[:, :3] @ torch.randn(3, 5, generator=gen)).argmax(1)
    return X, y


def make_gated():
    torch.manual_seed(0)
    X, _ = data()
    return dg.gate_model(MLP(), RECIPE, X[:4])


def train(model, opt, X, y, steps, penalty_of=None):
    for _ in range(steps):
        loss = F.cross_entropy(model(X), y)
        if penalty_of is not None:
            loss = loss + dg.penalty(penalty_of, LAM)
        opt.zero_grad()
        loss.backward()
        opt.step()


def penalty_optimizer(model):
    """SGD for training with loss + dg.penalty: no decay on the gated parameters, WD on the rest."""
    groups = dg.param_groups(model, LAM, weight_decay=WD)
    groups[0]["weight_decay"] = 0.0
    return torch.optim.SGD(groups, lr=LR, momentum=0.9)


def factors(model) -> torch.Tensor:
    return torch.cat([g.factors.detach().reshape(-1) for g in dg.gates(model)])


def plain_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def figures(report) -> list[int]:
    return [report.dead, report.groups, report.params_removable, report.params_total]


def reference() -> dict:
    """The one-process runs on the whole batch that the distributed runs must equal."""
    X, y = data()
    out = {}
    model = make_gated()
    opt = torch.optim.SGD(dg.param_groups(model, LAM, weight_decay=WD), lr=LR, momentum=0.9)
    train(model, opt, X, y, STEPS)
    out["ddp/factors"], out["ddp/sparsity"] = factors(model), figures(dg.sparsity(model, THRESHOLD))
    slim = dg.shrink(model, THRESHOLD, example_inputs=X[:8])
    out["ddp/slim"] = plain_state(slim)
    train(slim, torch.optim.SGD(slim.parameters(), lr=LR, momentum=0.9, weight_decay=WD), X, y, AFTER_STEPS)
    out["ddp/after"] = plain_state(slim)
    model = make_gated()  # what an unsynchronized rank would get: one process on half the batch
    opt = torch.optim.SGD(dg.param_groups(model, LAM, weight_decay=WD), lr=LR, momentum=0.9)
    train(model, opt, X[: len(X) // 2], y[: len(X) // 2], STEPS)
    out["half/factors"] = factors(model)

    model = make_gated()
    out["fsdp/penalty0"] = dg.penalty(model, LAM).item()
    train(model, penalty_optimizer(model), X, y, STEPS, penalty_of=model)
    out["fsdp/factors"], out["fsdp/sparsity"] = factors(model), figures(dg.sparsity(model, THRESHOLD))
    out["fsdp/state"] = plain_state(model)
    out["fsdp/slim"] = plain_state(dg.shrink(model, THRESHOLD, example_inputs=X[:8]))
    return out


def caught_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if "gated" in str(w.message) or "decay" in str(w.message)]


def error_of(fn) -> str:
    try:
        fn()
    except dg.DGatingError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def run(rank: int, world: int, out_path: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    X, y = data()
    part = slice(rank * len(X) // world, (rank + 1) * len(X) // world)
    out = {}

    # DDP: dg functions take the wrapper; training equals one process on the whole batch
    model = make_gated()
    ddp = DDP(model)
    opt = torch.optim.SGD(dg.param_groups(ddp, LAM, weight_decay=WD), lr=LR, momentum=0.9)
    monitor = dg.track(ddp, optimizer=opt, threshold=THRESHOLD)
    _, out["ddp/warnings"] = caught_warnings(lambda: (train(ddp, opt, X[part], y[part], STEPS), monitor.step(0)))
    out["ddp/factors"], out["ddp/sparsity"] = factors(ddp), figures(dg.sparsity(ddp, THRESHOLD))
    out["ddp/monitor_dead"] = sum(monitor.history[-1]["dead"].values())
    out["ddp/shrink_error"] = error_of(lambda: dg.shrink(ddp, THRESHOLD))
    if rank == 0:
        path = os.path.join(os.path.dirname(out_path), "ddp_gated.safetensors")
        dg.save_gated(ddp, path, reference="models:MLP", example_inputs=X[:4])
        out["ddp/saved_keys"] = sorted(dg.load_gated(path, trust_code=True).state_dict())
    # the documented sequence: cut the module on every rank, drop the wrapper, wrap again, new optimizer
    slim = dg.shrink(ddp.module, THRESHOLD, example_inputs=X[:8])
    out["ddp/slim"] = plain_state(slim)
    del ddp, opt
    ddp = DDP(slim)
    train(ddp, torch.optim.SGD(slim.parameters(), lr=LR, momentum=0.9, weight_decay=WD), X[part], y[part], AFTER_STEPS)
    out["ddp/after"] = plain_state(slim)

    # FSDP2: penalty on the shards, sparsity on gathered parameters, the cut from the full state
    model = make_gated()
    fully_shard(model.fc1)
    fully_shard(model)
    out["fsdp/penalty0"] = dg.penalty(model, LAM).item()
    out["fsdp/sharded_rows"] = model.fc1.parametrizations.weight.original.to_local().shape[0]
    opt = penalty_optimizer(model)
    _, out["fsdp/warnings"] = caught_warnings(lambda: dg.check_optimizer(model, opt, uses_penalty=True))
    train(model, opt, X[part], y[part], STEPS, penalty_of=model)
    out["fsdp/factors"] = torch.cat([g.factors.full_tensor().reshape(-1) for g in dg.gates(model)])
    out["fsdp/sparsity"] = figures(dg.sparsity(model, THRESHOLD))
    out["fsdp/monitor_dead"] = sum(dg.track(model, threshold=THRESHOLD).step(0)["dead"].values())
    out["fsdp/still_sharded"] = all(type(p).__name__ == "DTensor" for p in model.fc1.parameters())
    out["fsdp/shrink_error"] = error_of(lambda: dg.shrink(model, THRESHOLD))
    out["fsdp/save_error"] = error_of(lambda: dg.save_gated(model, out_path + ".x", reference="models:MLP",
                                                            example_inputs=X[:4]))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    plain = make_gated()
    plain.load_state_dict(state)
    out["fsdp/state"] = plain_state(plain)
    out["fsdp/slim"] = plain_state(dg.shrink(plain, THRESHOLD, example_inputs=X[:8]))
    torch.save(out, out_path)
    dist.barrier()


if __name__ == "__main__":
    import torch.distributed as dist

    rank, world, store, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        run(rank, world, out_path)
    finally:
        dist.destroy_process_group()
