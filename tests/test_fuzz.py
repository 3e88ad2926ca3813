"""A fast slice of the random-architecture fuzzer (benchmarks/fuzz.py runs thousands): every case
must gate, shrink and keep its function exactly, or be refused with an error naming the op.

A failing seed prints its model and what went wrong; reproduce it with ``random_arch.run_seed(seed)``
and shrink it with ``random_arch.minimize(seed)``, then add the minimal model to test_soundness.py.
"""
import pytest
import torch

import random_arch as R

SEEDS = range(150)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_architecture(seed):
    outcome, desc = R.run_seed(seed)
    assert outcome.kind not in ("wrong", "crash"), f"seed {seed}: {outcome}\n  model: {desc}"
    assert outcome.kind != "invalid", f"seed {seed}: the generator made a degenerate case: {desc}"


def test_generator_is_deterministic():
    a = R.make_case(12345)
    b = R.make_case(12345)
    assert a[2] == b[2]
    assert torch.equal(a[1][0], b[1][0])
    sa, sb = a[0].state_dict(), b[0].state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checker_catches_a_wrong_cut():
    """The checker itself: a model whose reference is all zeros is invalid, never exact."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert R.check_case(model, (torch.randn(2, 3),), 0).kind == "invalid"
