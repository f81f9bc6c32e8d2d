"""Tensor parallelism (transformers' ``tp_plan="auto"`` under ``torchrun``): which KV heads a rank's cache holds.

transformers splits each attention layer's KV heads evenly over the ranks, in rank order (``k_proj`` and ``v_proj`` are
sharded by output rows), so a rank's cache sees only its own heads. A cache with per-head artifacts (gates, ranks, a
sidecar's head embeddings, reference queries) then serves those heads only (`KeepPolicy.for_heads`,
`CompressorArtifact.for_heads`); the first attention call of each layer checks them against the layer's own shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


def rank_heads(local: int, total: int) -> range | None:
    """The KV heads this process holds when a layer of `total` KV heads shows it `local` of them: tensor parallelism over
    every process splits them evenly in rank order. None when this is not tensor parallelism (not distributed, or uneven);
    a split over some of the processes only (combined with other parallelism) is refused."""
    if not 0 < local < total or total % local or not (dist.is_available() and dist.is_initialized()):
        return None
    shards, processes = total // local, dist.get_world_size()
    if processes != shards:
        raise ValueError(
            f"This process holds {local} of the model's {total} KV heads, a tensor-parallel split over {shards} processes, but "
            f"{processes} processes run: kvcompress caches serve tensor parallelism over every process and nothing else "
            f"(torchrun --nproc_per_node {shards} with tp_plan='auto')."
        )
    rank = dist.get_rank()
    return range(rank * local, (rank + 1) * local)


def module_kv_heads(module, total: int, head_dim: int) -> range:
    """The KV heads an attention module computes: its ``k_proj`` rows' shard under tensor parallelism, else all of them."""
    weight = module.k_proj.weight
    sharded = [dim for dim, placement in enumerate(getattr(weight, "placements", ())) if isinstance(placement, Shard) and placement.dim == 0]
    if not isinstance(weight, DTensor) or not sharded:
        return range(total)
    rows = weight.to_local().shape[0]
    start = weight.device_mesh.get_local_rank(sharded[0]) * rows  # even shards: heads divide over the ranks
    return range(start // head_dim, (start + rows) // head_dim)


def full(weight: torch.Tensor) -> torch.Tensor:
    """A weight as one tensor: a sharded `DTensor` gathered from every rank (a collective: every rank must call it)."""
    return weight.full_tensor() if isinstance(weight, DTensor) else weight
