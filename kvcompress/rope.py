"""RoPE helpers: the model's rotary frequencies, and rotating keys to (or back from) their positions.

Methods that work on keys before RoPE (the gates, the low-rank projections, the sidecar's window frame)
undo the rotation at a token's position, and redo it where attention needs rotated keys. The sidecar
works in a window's own frame: its keys rotated back to the window's first position.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import rotate_half

from .models import kv_shape

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_inv_freq(model) -> torch.Tensor:
    """The model's RoPE frequencies; refuses RoPE variants whose frequencies change with the sequence."""
    rotary = model.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"RoPE type {rope_type!r} is not supported by the kvcompress caches that work on keys before RoPE "
            f"(they need fixed frequencies: {', '.join(SUPPORTED_ROPE_TYPES)})."
        )
    head_dim = kv_shape(model.config)[2]
    if rotary.inv_freq.numel() * 2 != head_dim:
        raise ValueError(f"Partial RoPE ({rotary.inv_freq.numel() * 2} of {head_dim} dims) is not supported by the kvcompress caches that work on keys before RoPE.")
    return rotary.inv_freq.detach().float().cpu()


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Apply (or undo) RoPE to `x` ``[B, H, n, D]`` at `positions` ``[B, n]`` (or per head, ``[B, H, n]``), as transformers' Llama does."""
    freqs = positions[..., None].float() * inv_freq.float()
    angles = torch.cat([freqs, freqs], dim=-1)
    angles = angles[:, None] if positions.dim() == 2 else angles
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return x * cos + rotate_half(x) * (-sin if inverse else sin)


def to_window_frame(keys: torch.Tensor, starts: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = True) -> torch.Tensor:
    """Rotate keys ``[n, H, m, D]`` back (or, with ``inverse=False``, forward) by each window's start position ``[n]``."""
    positions = starts[:, None].expand(-1, keys.shape[2])
    return rotate(keys, positions, inv_freq, inverse=inverse)


def window_frame_references(queries: torch.Tensor, offsets: torch.Tensor, window: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Reference queries ``[L, H, M, D]`` (before RoPE) rotated to `offsets` ``[M]`` tokens after a window's end, in its frame."""
    positions = (window + offsets)[None].expand(queries.shape[0], -1)
    return rotate(queries, positions, inv_freq)
