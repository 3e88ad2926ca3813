"""The core invariant on real torchvision architectures, one per family of op rules (the whole
zoo of 80 runs in benchmarks/zoo.py)."""
import pytest
import torch
import torchvision

from conftest import assert_exact_cut

FAMILIES = {
    "resnet18": "residual adds",
    "resnext50_32x4d": "grouped convs",
    "mobilenet_v3_small": "depthwise, squeeze-excitation with hardsigmoid",
    "efficientnet_b0": "depthwise, squeeze-excitation with sigmoid, stochastic depth",
    "densenet121": "concatenation read by many BatchNorms",
    "shufflenet_v2_x0_5": "chunk, channel shuffle via view/transpose",
    "squeezenet1_1": "concatenation, conv classifier",
    "googlenet": "inception concat, auxiliary classifiers, namedtuple outputs",
    "vgg11_bn": "flatten into linear layers",
    "regnet_x_400mf": "group width convs",
    "vit_b_32": "transformer MLP neurons, fixed reshape, LayerNorm",
    "swin_t": "windows, permutes, LayerNorm, wrapped attention",
    "convnext_tiny": "channels-last linear layers, layer scale, LayerNorm2d",
}


# their rules run in the default suite elsewhere: test_recipes (densenet, efficientnet), mobilenet, regnet,
# inception below, test_heads' two-layer torchvision VisionTransformer
SLOW = {"densenet121", "efficientnet_b0", "resnext50_32x4d", "googlenet", "vgg11_bn", "vit_b_32"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in FAMILIES])
def test_zoo_model_cut_is_exact(name):
    model = torchvision.models.get_model(name, weights=None)
    check = assert_exact_cut(model, torch.randn(1, 3, 224, 224), "default", fraction=0.3, seed=0, min_groups=100)
    assert check.groups_cut > 0


def test_inception_trains_and_cuts_aux_branch():
    """In train mode inception_v3 runs its auxiliary classifier: the cut must slice it too."""
    model = torchvision.models.inception_v3(weights=None, init_weights=False)
    assert_exact_cut(model, torch.randn(1, 3, 299, 299), "default", min_groups=100)
    model.train()
    out = model(torch.randn(2, 3, 299, 299))
    assert out.aux_logits.shape == (2, 1000)
