import os
import warnings

import pytest
import torch

import dgating_surgery as dg

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: each on one thread, not two contending
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*matched nothing.*")
    yield


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_exact_cut(model, inputs, recipe="default", fraction=0.3, seed=0, min_groups=1, **kwargs):
    """The core invariant: gating keeps the function, shrinking with dead gates keeps it and
    removes exactly the dead groups' parameters, and leaves no gate behind; on weights that can
    expose a wrong cut (``dg.expose_weights``)."""
    dg.expose_weights(model, seed)
    check = dg.random_cut_check(model, inputs, recipe, fraction=fraction, seed=seed, **kwargs)
    assert check.groups_gated >= min_groups, check
    assert check.gate_diff <= 1e-4, check
    assert check.slim_diff <= 1e-4, check
    assert check.gates_left == 0, check
    assert check.params_before - check.params_after == check.params_expected_removed, check
    if check.groups_cut:
        assert check.params_after < check.params_before, check
    return check
