"""RoPE helpers: the model's rotary frequencies, and rotating keys to (or back from) their positions.

Methods that work on keys before RoPE (the gates, the low-rank projections, the sidecar's window frame)
undo the rotation at a token's position, and redo it where attention needs rotated keys. The sidecar
works in a window's own frame: its keys rotated back to the window's first position.
"""

from __future__ import annotations

import torch

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
    angles = positions[..., None].float() * inv_freq.float()
    return _rotated(x, angles.cos(), angles.sin(), positions.dim() == 2, inverse)


def rope_table(inv_freq: torch.Tensor, length: int) -> torch.Tensor:
    """cos and sin of every position below `length` and every frequency, side by side ``[length, D]``: read as complex
    numbers, a row turns a key whose RoPE pairs sit side by side (`paired_order`) to its position (`rotate_pairs_`)."""
    angles = torch.arange(length, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq.float()
    return torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(-2)


def paired_order(dim: int) -> torch.Tensor:
    """The order of a head's `dim` dimensions that puts each pair RoPE turns together, i and i + dim / 2, side by side."""
    half = torch.arange(dim // 2)
    return torch.stack([half, half + dim // 2], dim=-1).flatten()


def rotate_pairs_(x: torch.Tensor, table_rows: torch.Tensor) -> torch.Tensor:
    """`x` ``[B, H, n, D]`` in `paired_order`, turned in place by `rope_table` rows ``[B, n, D]`` (or per head ``[B, H, n, D]``).

    One complex product instead of transformers' ``x * cos + rotate_half(x) * sin``, and no new tensor: for the many keys
    that attention decodes every step on the CPU. Arithmetic in float32 for half-precision keys."""
    if table_rows.dim() == 3:
        table_rows = table_rows[:, None]
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    turn = torch.view_as_complex(table_rows.to(dtype).unflatten(-1, (-1, 2)))
    if x.dtype == dtype:
        torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(turn)
        return x
    return x.copy_(torch.view_as_real(torch.view_as_complex(x.to(dtype).unflatten(-1, (-1, 2))) * turn).flatten(-2))


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shared_by_heads: bool, inverse: bool) -> torch.Tensor:
    """`x` rotated by the angles whose cos and sin are given per position ``[..., n, D / 2]``: transformers' ``x * cos +
    rotate_half(x) * sin`` on the two halves, without building the full-width cos, sin and rotated copies."""
    if shared_by_heads:
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), (-sin if inverse else sin).to(x.dtype)
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    if torch.is_grad_enabled() and x.requires_grad:  # training (the fitted methods' losses): written out, for autograd
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
    out = torch.empty(torch.broadcast_shapes(x.shape, (*cos.shape[:-1], x.shape[-1])), dtype=x.dtype, device=x.device)
    torch.mul(first, cos, out=out[..., :half]).addcmul_(second, sin, value=-1)
    torch.mul(second, cos, out=out[..., half:]).addcmul_(first, sin)
    return out


def to_window_frame(keys: torch.Tensor, starts: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = True) -> torch.Tensor:
    """Rotate keys ``[n, H, m, D]`` back (or, with ``inverse=False``, forward) by each window's start position ``[n]``."""
    positions = starts[:, None].expand(-1, keys.shape[2])
    return rotate(keys, positions, inv_freq, inverse=inverse)


def window_frame_references(queries: torch.Tensor, offsets: torch.Tensor, window: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Reference queries ``[L, H, M, D]`` (before RoPE) rotated to `offsets` ``[M]`` tokens after a window's end, in its frame."""
    positions = (window + offsets)[None].expand(queries.shape[0], -1)
    return rotate(queries, positions, inv_freq)
