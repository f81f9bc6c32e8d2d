"""Learned retention gates (seed 004): per KV head, an MLP on a token's key predicts whether the token
will matter to future queries once it has left the recent window.

`GateBank` holds the gates of every head of every layer stacked (``[layers * heads, ...]``), so one
layer's heads are scored with three batched matmuls and no Python loop over heads.
"""

from __future__ import annotations

import torch


class GateBank(torch.nn.Module):
    """Per-head MLPs ``head_dim -> hidden -> hidden -> 1`` (ReLU), returning retention logits."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, hidden: int = 256):
        super().__init__()
        self.num_layers, self.num_heads, self.head_dim, self.hidden = num_layers, num_heads, head_dim, hidden
        groups = num_layers * num_heads
        shapes = {"w1": (groups, head_dim, hidden), "w2": (groups, hidden, hidden), "w3": (groups, hidden, 1)}
        for name, shape in shapes.items():
            self.register_parameter(name, torch.nn.Parameter(torch.randn(shape) * (2 / shape[1]) ** 0.5))
        for name, width in (("b1", hidden), ("b2", hidden), ("b3", 1)):
            self.register_parameter(name, torch.nn.Parameter(torch.zeros(groups, 1, width)))

    def forward(self, keys: torch.Tensor, groups: slice = slice(None)) -> torch.Tensor:
        """Logits ``[G, n]`` for keys ``[G, n, head_dim]`` of the gates in `groups` (default: all)."""
        hidden = torch.relu(torch.baddbmm(self.b1[groups], keys, self.w1[groups]))
        hidden = torch.relu(torch.baddbmm(self.b2[groups], hidden, self.w2[groups]))
        return torch.baddbmm(self.b3[groups], hidden, self.w3[groups])[..., 0]

    def layer_logits(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, H, n]`` of one layer's gates for its keys ``[B, H, n, head_dim]``."""
        batch, heads, length, dim = keys.shape
        flat = keys.transpose(0, 1).reshape(heads, batch * length, dim).to(self.w1.dtype)
        logits = self(flat, slice(layer * heads, (layer + 1) * heads))
        return logits.view(heads, batch, length).transpose(0, 1)
