"""Attention piece by piece: the partial softmax of a set of keys, and the merge of partials over disjoint sets.

The caches attend over a table in parts (the store in its encoding, the exact tail; spans of slots in
the Triton kernels) and merge the parts through their maxima, flash attention's log-sum-exp bookkeeping.
"""

from __future__ import annotations

import torch


def softmax_part_(logits: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The partial softmax of float32 `logits` ``[..., R, S]`` (-inf: masked) over `values` ``[..., S, D]``, as
    `merge_softmax` takes it; the largest logit is kept finite when a query sees none of these keys. The weights
    overwrite `logits` (no second tensor of their size)."""
    top = logits.amax(-1).clamp_(min=torch.finfo(torch.float32).min)
    weights = logits.sub_(top[..., None]).exp_()
    if values.dim() == 4 and values.shape[1] == 1 < weights.shape[1]:  # values shared by the heads: one product, heads as rows (no broadcast copy)
        return top, weights.sum(-1), torch.matmul(weights.flatten(1, 2), values[:, 0].float()).view(*weights.shape[:-1], values.shape[-1])
    return top, weights.sum(-1), torch.matmul(weights, values.float())


def merge_softmax(top: torch.Tensor, total: torch.Tensor, values: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge partial softmaxes over disjoint key sets, stacked along `dim`, into one.

    Each part is (its largest logit, the sum of its weights taken relative to it, those weights
    times the values) per query: the log-sum-exp bookkeeping that lets attention over a table be
    computed piece by piece. Largest logits must be finite.
    """
    merged = top.amax(dim, keepdim=True)
    weight = (top - merged).exp()
    return merged.squeeze(dim), (total * weight).sum(dim), (values * weight.unsqueeze(-1)).sum(dim)


def attend_with_part(part: tuple[torch.Tensor, torch.Tensor, torch.Tensor], logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Normalized attention output ``[..., R, D]`` over float32 `logits` ``[..., R, S]`` (-inf: masked) and `values`
    ``[..., S, D]`` together with keys already summed in `part` (`softmax_part_`'s form): the merge of two partial softmaxes
    without stacking them. A row that sees no key gets zeros."""
    top, total, weighted = part
    merged = torch.maximum(top, logits.amax(-1))
    weights = (logits - merged[..., None]).exp()
    rescale = (top - merged).exp()
    total = torch.addcmul(weights.sum(-1), total, rescale)
    output = torch.matmul(weights, values.float()).addcmul_(weighted, rescale[..., None])
    return output / total.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
