"""Two processes, gloo on CPU: D-Gating under DistributedDataParallel and FSDP2 trains exactly as
one process on the concatenated batch (factors identical across ranks and equal to the
one-process run), the dg functions take the wrapped or sharded model, and the cut after training
gives the same slim model on every rank (tests/dist_worker.py is one rank)."""
import os
import subprocess
import sys

import pytest
import torch

import dgating_surgery as dg

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
TIMEOUT_S = 150

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both ranks' results (one run of the worker for every test here) and the one-process reference."""
    tmp = tmp_path_factory.mktemp("dist")
    store = tmp / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")])}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "dist_worker.py"), str(rank), str(WORLD),
                               str(store), str(tmp / f"rank{rank}.pt")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(WORLD)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"the {WORLD} ranks did not finish in {TIMEOUT_S} s")
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    results = [torch.load(tmp / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]

    import dist_worker
    torch.set_num_threads(1)
    return results, dist_worker.reference()


def assert_states_equal(a: dict, b: dict, atol=0.0):
    """Bit for bit (atol=0), or close: after 100 steps the summation order shows at ~1e-4."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        if atol:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-3, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_factors_identical_across_ranks_and_equal_to_one_process(runs, mode):
    (r0, r1), ref = runs
    assert torch.equal(r0[f"{mode}/factors"], r1[f"{mode}/factors"])
    # 100 SGD steps amplify the different summation order to ~1e-4; a rank that trained on its half
    # of the batch alone would be off by far more
    torch.testing.assert_close(r0[f"{mode}/factors"], ref[f"{mode}/factors"], atol=1e-3, rtol=1e-3)
    assert (ref["half/factors"] - ref[f"{mode}/factors"]).abs().max() > 0.1
    # groups died, and the global sparsity (under FSDP2: of the gathered parameters) is the one-process one
    assert r0[f"{mode}/sparsity"] == r1[f"{mode}/sparsity"] == ref[f"{mode}/sparsity"]
    dead, groups = ref[f"{mode}/sparsity"][:2]
    assert 0 < dead < groups == 35
    assert r0[f"{mode}/monitor_dead"] == r1[f"{mode}/monitor_dead"] == dead


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_shrink_after_training_gives_the_same_slim_model_on_every_rank(runs, mode):
    (r0, r1), ref = runs
    assert_states_equal(r0[f"{mode}/slim"], r1[f"{mode}/slim"])
    assert_states_equal(r0[f"{mode}/slim"], ref[f"{mode}/slim"], atol=1e-3)
    dead = ref[f"{mode}/sparsity"][0]
    kept = r0[f"{mode}/slim"]["fc1.weight"].shape[0] + r0[f"{mode}/slim"]["fc2.weight"].shape[0]
    assert kept == 35 - dead


def test_ddp_wrapper_is_accepted_and_a_live_cut_refused(runs):
    (r0, r1), ref = runs
    for r in (r0, r1):
        assert r["ddp/warnings"] == []  # param_groups + track through the wrapper: no false warning
        assert r["ddp/shrink_error"].startswith("ShrinkError: dg.shrink got a live DistributedDataParallel wrapper")
        assert "slim = dg.shrink(model.module, ...)" in r["ddp/shrink_error"]
        assert "build a new optimizer" in r["ddp/shrink_error"]
    # save_gated through the wrapper writes the module's keys, which load_gated reads back
    assert r0["ddp/saved_keys"] and not any(k.startswith(("module.", "_orig_mod.")) for k in r0["ddp/saved_keys"])
    assert "dgates.fc1.factors" in r0["ddp/saved_keys"]


def test_ddp_wrapped_again_after_the_cut_keeps_replicas_in_sync(runs):
    """The documented sequence (cut the module on every rank, wrap again, new optimizer): training
    goes on synchronized, equal to one process on the whole batch."""
    (r0, r1), ref = runs
    assert_states_equal(r0["ddp/after"], r1["ddp/after"])
    assert_states_equal(r0["ddp/after"], ref["ddp/after"], atol=1e-3)
    assert not torch.equal(r0["ddp/after"]["fc1.weight"], r0["ddp/slim"]["fc1.weight"])


def test_fsdp2_penalty_sparsity_and_the_cut_recipe(runs):
    (r0, r1), ref = runs
    for r in (r0, r1):
        assert r["fsdp/sharded_rows"] == 10  # fc1's 20 rows, split over 2 ranks
        assert r["fsdp/penalty0"] == pytest.approx(ref["fsdp/penalty0"], rel=1e-6)  # global value on every rank
        assert r["fsdp/warnings"] == []
        assert r["fsdp/still_sharded"]  # sparsity and track gathered, then sharded again
        assert r["fsdp/shrink_error"].startswith("ShrinkError: dg.shrink cannot work on an FSDP2-sharded model")
        assert "get_model_state_dict" in r["fsdp/shrink_error"] and "full_state_dict=True" in r["fsdp/shrink_error"]
        assert r["fsdp/save_error"].startswith("CheckpointError: dg.save_gated cannot work on an FSDP2-sharded model")
    # the trained weights gathered from the shards equal one process's, with the penalty's gradient per shard
    assert_states_equal(r0["fsdp/state"], r1["fsdp/state"])
    assert_states_equal(r0["fsdp/state"], ref["fsdp/state"], atol=1e-3)
