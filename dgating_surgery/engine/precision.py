"""Low-precision weights: the balanced init that keeps a bfloat16/float16 model's function bit for
bit, and the check that tells a user whose weight decay rounds away.

With pure bfloat16 weights an SGD weight-decay step ``p -= lr * wd * p`` changes p by a relative
``lr * wd`` (typically 1e-5), far below bfloat16's resolution (a relative change under 2^-9 rounds
back to p): the decay never happens and no group dies. Keep float32 weights and train under
``torch.autocast`` (or FSDP2's ``MixedPrecisionPolicy``), which computes in bfloat16 and updates in
float32.
"""
from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def _mantissa_bits(dtype: torch.dtype) -> int:
    return {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}.get(dtype, 23)


def rounding(dtype: torch.dtype) -> float:
    """A relative change smaller than this rounds every value of ``dtype`` back to itself (round to
    nearest: half the spacing just below the next power of two): 2^-9 for bfloat16, 2^-12 for
    float16."""
    return 2.0 ** -(_mantissa_bits(dtype) + 2)


def balanced_split(norm: torch.Tensor, D: int, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The balanced init of one gate: (factors of shape (D-1, groups), scale of each group's primary
    weights), with ``prod(factors[:, j]) * scale[j] == 1``.

    ``exact=False``: every factor is ||w_j||^(1/D) and theta_j = w_j / ||w_j||^((D-1)/D) (perfect
    balance; in float32 the function changes by rounding, ~1e-7). ``exact=True`` (bfloat16/float16
    weights, where that rounding is ~1e-3): the nearest powers of two, so that multiplying by the
    scale and by the gate is exact and the function is unchanged bit for bit; the factors are
    then balanced within a factor of 2."""
    norm = norm.to(torch.float64)
    if not exact:
        return norm.pow(1.0 / D).expand(D - 1, -1), norm.pow(-(D - 1) / D)
    total = torch.round(torch.log2(norm) * (D - 1) / D).long()  # the gate's exponent
    base = torch.div(total, D - 1, rounding_mode="floor")
    extra = total - base * (D - 1)  # 0 .. D-2 factors get one more
    rows = torch.arange(D - 1).unsqueeze(1)
    exponents = base.unsqueeze(0) + (rows < extra.unsqueeze(0)).long()
    return torch.pow(2.0, exponents.double()), torch.pow(2.0, -total.double())
