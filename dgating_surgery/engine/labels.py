"""Group labels on tensors: which removable element each entry belongs to, and a union-find over them.

Every producer of a structured group (a conv's output channels, a linear's neurons, an input's
features, a parameter used element-wise) allocates fresh element ids. Ops move those ids around
(the same op is run on an id tensor in place of the data) and tie ids that must be removed
together into one component. A label tensor is kept compressed: size 1 along every dim where it is
constant, so a (N, C, H, W) activation labelled by channel costs C entries, not N*C*H*W.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NONE = -1  # the id of an entry that belongs to no group


class UnionFind:
    """Union-find over element ids, vectorized with numpy (roots are the smallest id)."""

    def __init__(self) -> None:
        self._parent = np.zeros(1024, dtype=np.int64)
        self.size = 0

    def alloc(self, n: int) -> np.ndarray:
        """Fresh ids ``size .. size+n-1``, each its own component."""
        need = self.size + n
        if need > len(self._parent):
            grown = np.zeros(max(need, 2 * len(self._parent)), dtype=np.int64)
            grown[: self.size] = self._parent[: self.size]
            self._parent = grown
        ids = np.arange(self.size, need, dtype=np.int64)
        self._parent[self.size: need] = ids
        self.size = need
        return ids

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Roots of ``ids`` (entries that are NONE stay NONE), with path compression."""
        ids = np.asarray(ids, dtype=np.int64)
        valid = ids >= 0
        roots = ids[valid]
        while True:
            up = self._parent[roots]
            if np.array_equal(up, roots):
                break
            roots = self._parent[up]
        self._parent[ids[valid]] = roots
        out = np.full(ids.shape, NONE, dtype=np.int64)
        out[valid] = roots
        return out

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie ``a[i]`` to ``b[i]`` wherever both are ids (arrays broadcast against each other)."""
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        both = (a >= 0) & (b >= 0)
        a, b = a[both].ravel(), b[both].ravel()
        while a.size:
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            ra, rb = ra[differ], rb[differ]
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            self._parent[hi] = lo  # conflicting writes are fine: the loop repeats until all agree
            a, b = a[differ], b[differ]

    def roots(self) -> np.ndarray:
        return self.find(np.arange(self.size, dtype=np.int64))


@dataclass
class Labels:
    """Group ids of a tensor's entries plus whether each entry is exactly zero when its gate is.

    ``zaff``: zero when only per-channel affines (BatchNorm, depthwise conv, element-wise
    parameters) are scaled by the gate; ``zall``: zero when the producing conv/linear is scaled too
    (the ``zero_flag`` of the gating policies in ``kinds.POLICIES``). All three tensors have one
    shape, broadcastable to the tensor they describe.
    """

    ids: torch.Tensor
    zaff: torch.Tensor
    zall: torch.Tensor

    @staticmethod
    def fresh(ids: torch.Tensor, zaff: bool, zall: bool) -> "Labels":
        return Labels(ids, torch.full(ids.shape, zaff), torch.full(ids.shape, zall))

    @staticmethod
    def unlabeled(shape) -> "Labels":
        return Labels(torch.full(tuple(shape), NONE, dtype=torch.int64), torch.zeros(tuple(shape), dtype=torch.bool),
                      torch.zeros(tuple(shape), dtype=torch.bool))

    def map(self, fn) -> "Labels":
        return Labels(fn(self.ids), fn(self.zaff), fn(self.zall))

    def not_zero(self) -> "Labels":
        """The same groups, no longer exactly zero when gated (after an op with f(0) != 0)."""
        return Labels(self.ids, torch.zeros_like(self.zaff), torch.zeros_like(self.zall))

    def reduced(self, dims) -> "Labels":
        """The labels after an op combines entries along ``dims`` (kept, size 1), dims along which the ids
        do not vary: an entry of the result is exactly zero only where every entry it combines is."""
        ids, zaff, zall = self.ids, self.zaff, self.zall
        for d in dims:
            if ids.shape[d] > 1:
                ids = ids.narrow(d, 0, 1)
            zaff = zaff.all(d, keepdim=True) if zaff.shape[d] > 1 else zaff
            zall = zall.all(d, keepdim=True) if zall.shape[d] > 1 else zall
        return Labels(*torch.broadcast_tensors(ids, zaff, zall))

    def compressed(self) -> "Labels":
        """Shrink every dim along which ids and zero flags are constant to size 1."""
        ids, zaff, zall = self.ids, self.zaff, self.zall
        for d in range(ids.ndim):
            if ids.shape[d] > 1 and all(bool((t == t.narrow(d, 0, 1)).all()) for t in (ids, zaff, zall)):
                ids, zaff, zall = (t.narrow(d, 0, 1) for t in (ids, zaff, zall))
        return Labels(ids.contiguous(), zaff.contiguous(), zall.contiguous())

    def varying_dims(self) -> list[int]:
        """The dims along which the group ids change (the zero flags may vary along others)."""
        ids = self.ids
        return [d for d in range(ids.ndim) if ids.shape[d] > 1 and not bool((ids == ids.narrow(d, 0, 1)).all())]

    @property
    def any(self) -> bool:
        return bool((self.ids >= 0).any())
