"""Closed-form attention matching (Zweiger et al. 2026, "Fast KV Compaction via Attention Matching"):
the training-free rival of the sidecar, merging a window of N tokens into k slots per head.

For reference queries q (post-RoPE, as attention will see them), a window's keys K and values V
contribute to attention through two quantities only: its *mass* ``m(q) = sum_j exp(q.k_j / sqrt d)``
and its *local output* ``y(q) = sum_j exp(q.k_j / sqrt d) v_j / m(q)``. If the k slots reproduce both,
the window's share of any softmax it competes in, and what it adds there, are unchanged. Three
closed-form steps (per window and head, batched over both):

1. keys: keep the k keys with the largest root-mean-square attention over the reference queries;
2. mass: one additive logit bias per kept key, ``beta = log w`` with ``w >= 0`` the non-negative
   least-squares fit of ``exp(q.k_sel / sqrt d) w / m(q) = 1`` (relative, so that every query
   counts; one key cannot carry N tokens' mass for every query, the bias is what lets it);
3. values: least squares of the slots' local output against ``y(q)``, ridge-pulled toward the kept
   keys' own values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MergedWindows:
    keys: torch.Tensor  # [..., k, D]
    values: torch.Tensor  # [..., k, Dv]
    bias: torch.Tensor  # [..., k]: additive attention-logit bias of each slot
    selected: torch.Tensor  # [..., k]: which of the window's N tokens each slot's key came from


def _logits(queries: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    logits = queries @ keys.transpose(-1, -2) * keys.shape[-1] ** -0.5
    return logits if bias is None else logits + bias[..., None, :]


def window_mass_and_output(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None = None):
    """Log-mass ``[..., Q]`` and local output ``[..., Q, Dv]`` of windows ``keys [..., N, D]`` for ``queries [..., Q, D]``."""
    logits = _logits(queries, keys, bias)
    return logits.logsumexp(-1), logits.softmax(-1) @ values


def _largest_eigenvalue(gram: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """``[..., 1]``: the largest eigenvalue of symmetric matrices with nonnegative entries, by power iteration.

    Batched matmuls only: a batched eigensolver (cusolver) fails on the hundreds of thousands of
    windows one GPU prefill merges. The all-ones start has a component along the top eigenvector
    (Perron-Frobenius), so the Rayleigh quotient converges to it from below.
    """
    vector = torch.ones_like(gram[..., 0])
    for _ in range(iterations):
        vector = (gram @ vector[..., None])[..., 0]
        vector = vector / vector.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    return (vector * (gram @ vector[..., None])[..., 0]).sum(-1, keepdim=True)


def _nonnegative_least_squares(design: torch.Tensor, target: torch.Tensor, iterations: int) -> torch.Tensor:
    """Batched ``argmin_{w >= 0} |design w - target|`` for ``design [..., Q, k]``, ``target [..., Q]``: the least-squares
    solution where it is nonnegative everywhere (then it is the optimum: always for k = 1 with a positive target), else
    projected gradient from it, clamped, with the step 1/L of the Gram matrix's largest eigenvalue (k is small)."""
    gram = design.transpose(-1, -2) @ design  # nonnegative entries: design holds attention probabilities
    rhs = (design.transpose(-1, -2) @ target[..., None])[..., 0]
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    weights, info = torch.linalg.solve_ex(gram + 1e-9 * trace, rhs)  # exact when no constraint binds
    singular = (info != 0) | ~weights.isfinite().all(-1)
    if bool(singular.any()):  # equal keys (e.g. padding tokens' zero keys): a jitter above the dtype's rounding, for those windows only
        steadied = torch.linalg.solve(gram + 16 * torch.finfo(gram.dtype).eps * trace + torch.finfo(gram.dtype).tiny * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device), rhs)
        weights = torch.where(singular[..., None], steadied, weights)
    if not bool((weights < 0).any()):  # no constraint binds: one check instead of some 600 small operations
        return weights
    step = 1 / _largest_eigenvalue(gram).clamp(min=1e-12)
    weights = weights.clamp(min=0)
    for _ in range(iterations):
        weights = (weights - step * ((gram @ weights[..., None])[..., 0] - rhs)).clamp(min=0)
    return weights


def attention_matching_merge(
    keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, slots: int, ridge: float = 1e-3, iterations: int = 100,
    excluded: torch.Tensor | None = None,
) -> MergedWindows:
    """Merge windows ``keys [..., N, D]``, ``values [..., N, Dv]`` into `slots` keys, values and biases
    that reproduce each window's attention mass and local output for ``queries [..., Q, D]``
    (leading dimensions broadcast: e.g. windows ``[n, H]`` and one query set per head ``[1, H]``).

    `excluded` ``[..., N]`` marks tokens held elsewhere (kept exact): the slots reproduce the rest of the
    window. A slot whose key would be an excluded token (fewer than `slots` tokens left) gets weight 0,
    i.e. a bias of log(1e-12): callers drop such slots (`selected` says which token each came from)."""
    length = keys.shape[-2]
    if not 1 <= slots <= length:
        raise ValueError(f"slots must be between 1 and the window length {length}, got {slots}.")
    keys, values, queries = keys.float(), values.float(), queries.float()
    logits = _logits(queries, keys)
    if excluded is not None:  # a wholly excluded window keeps its logits (its slots are dropped): no softmax over nothing
        excluded = excluded & ~excluded.all(-1, keepdim=True)
        logits = logits.masked_fill(excluded[..., None, :], float("-inf"))
    attention = logits.softmax(-1)  # [..., Q, N], within the window
    output = attention @ values
    selected = attention.square().mean(-2).sqrt().topk(slots, dim=-1).indices.sort(-1).values  # largest RMS attention
    chosen_keys = keys.gather(-2, selected[..., None].expand(*selected.shape, keys.shape[-1]))
    chosen_values = values.gather(-2, selected[..., None].expand(*selected.shape, values.shape[-1]))
    # exp(q.k_sel / sqrt d) / m(q) is the kept key's attention within the window, so the relative mass fit is design w = 1
    design = attention.gather(-1, selected[..., None, :].expand(*attention.shape[:-1], slots))  # [..., Q, k]
    weights = _nonnegative_least_squares(design, torch.ones_like(design[..., 0]), iterations).clamp(min=1e-12)
    probabilities = design * weights[..., None, :]
    probabilities = probabilities / probabilities.sum(-1, keepdim=True).clamp(min=1e-30)
    gram = probabilities.transpose(-1, -2) @ probabilities
    regulariser = ridge * torch.eye(slots, dtype=gram.dtype, device=gram.device)
    merged_values = torch.linalg.solve(gram + regulariser, probabilities.transpose(-1, -2) @ output + ridge * chosen_values)
    return MergedWindows(chosen_keys, merged_values, weights.log(), selected)
