"""The core invariant beyond torchvision's classification zoo: timm models built on other ops
(MLP-Mixer, GhostNet, RexNet, LeViT, PoolFormer, MobileViT, ...) and torchvision's segmentation and
video models. Same check as benchmarks/zoo.py (smallest recipe, weights that can expose a wrong cut,
30% of every gate's groups zeroed).

    python benchmarks/beyond_zoo.py     # about 40 s on 2 cores
"""
from __future__ import annotations

import sys
import warnings

import torch
import torchvision

import dgating_surgery as dg

TIMM = ["mixer_s16_224", "ghostnet_100", "rexnet_100", "levit_128s", "poolformer_s12", "mobilevit_xxs", "regnetz_b16",
        "cspresnet50", "dla34", "res2net50_26w_4s", "skresnet18", "xception41", "repvgg_a0", "lcnet_050"]
TORCHVISION = [("fcn_resnet50", (1, 3, 128, 128)), ("deeplabv3_mobilenet_v3_large", (1, 3, 128, 128)),
               ("lraspp_mobilenet_v3_large", (1, 3, 128, 128)), ("r3d_18", (1, 3, 8, 64, 64)),
               ("mvit_v2_s", (1, 3, 16, 224, 224)), ("swin3d_t", (1, 3, 8, 64, 64))]


def models():
    import timm
    for name in TIMM:
        model = timm.create_model(name, pretrained=False)
        yield f"timm/{name}", model, torch.randn(1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    for name, shape in TORCHVISION:
        kwargs = {"weights_backbone": None} if "resnet50" in name or "mobilenet" in name else {}
        yield f"torchvision/{name}", torchvision.models.get_model(name, weights=None, **kwargs), torch.randn(*shape)


def main() -> int:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    print(f"{'model':42s} {'gated':>7s} {'cut':>6s} {'params before':>14s} {'params after':>13s} "
          f"{'gate diff':>10s} {'slim diff':>10s} ok")
    passed = total = 0
    for name, model, x in models():
        total += 1
        c = dg.random_cut_check(dg.expose_weights(model), x, "default", fraction=0.3, seed=0)
        passed += c.ok
        print(f"{name:42s} {c.groups_gated:7d} {c.groups_cut:6d} {c.params_before:14,d} {c.params_after:13,d} "
              f"{c.gate_diff:10.1e} {c.slim_diff:10.1e} {'yes' if c.ok else 'NO'}", flush=True)
    print(f"exact: {passed}/{total} models")
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
