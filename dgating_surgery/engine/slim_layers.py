"""Layers whose forward cannot follow a cut through their attributes alone get a subclass here that
computes from the widths of their own tensors; the attribute fixers switch a cut layer to it (so
``isinstance`` still holds, and ``load_slim`` does the same on a rebuilt model)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SlimMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` after some of its heads were cut: ``F.multi_head_attention_forward``
    takes the head width from ``embed_dim // num_heads``, which no longer holds, so attention is
    computed here with ``head_dim`` per head and ``num_heads`` heads (self- or cross-attention with
    one packed ``in_proj``; 2-D or boolean masks, a key padding mask, optional weights)."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, source = query.shape[0], query.shape[1], key.shape[1]
        weights = self.in_proj_weight.chunk(3)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = (F.linear(t, w, b).view(batch, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
                   for t, w, b in zip((query, key, value), weights, biases))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        scores = scores + self._mask(attn_mask, key_padding_mask, is_causal, batch, length, source, scores.dtype)
        attention = scores.softmax(-1)
        dropped = F.dropout(attention, self.dropout, self.training) if self.dropout else attention
        out = self.out_proj((dropped @ v).transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attention.mean(1) if average_attn_weights else attention

    def _mask(self, attn_mask, key_padding_mask, is_causal, batch, length, source, dtype) -> torch.Tensor:
        """The additive mask (batch or 1, 1, length, source): -inf where attention is not allowed."""
        mask = torch.zeros(1, 1, length, source, dtype=dtype)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() != 2:
                raise ValueError("a cut nn.MultiheadAttention takes a 2-D attn_mask (one for every head): the "
                                 "per-head masks were made for the heads before the cut")
            mask = mask + _additive(attn_mask, dtype).view(1, 1, length, source)
        if key_padding_mask is not None:
            mask = mask + _additive(key_padding_mask, dtype).view(batch, 1, 1, source)
        return mask


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
