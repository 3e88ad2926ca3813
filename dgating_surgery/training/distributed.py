"""Distributed training of a gated model beyond what the engine's wrapper handling does
(``engine.wrappers``: DDP, FSDP2, torch.compile): converting its BatchNorms to ``SyncBatchNorm``."""
from __future__ import annotations

from torch import nn


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` for a gated model (torch's raises a TypeError on a
    gated BatchNorm, whose weight is computed from its primary weight and gate). Keeps the same
    parameter objects (an optimizer built before still holds them) and the gates. Returns the
    converted model (a new module only when ``model`` itself is a BatchNorm)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.utils import parametrize

    def convert(module):
        if not isinstance(module, _BatchNorm) or isinstance(module, nn.SyncBatchNorm):
            for name, child in module.named_children():
                new = convert(child)
                if new is not child:
                    module.add_module(name, new)
            return module
        out = nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        chains = {}
        if module.affine:
            for name in ("weight", "bias"):
                if parametrize.is_parametrized(module, name):
                    plist = module.parametrizations[name]
                    out._parameters[name] = plist.original
                    chains[name] = list(plist)
                else:
                    out._parameters[name] = module._parameters[name]
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            out._buffers[name] = module._buffers.get(name)
        for name, chain in chains.items():
            for parametrization in chain:
                parametrize.register_parametrization(out, name, parametrization, unsafe=True)
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
        return out

    return convert(model)
