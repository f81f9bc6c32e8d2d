"""Shared training helpers for the fitted compressors."""

from __future__ import annotations

import torch

VALIDATION_SEQUENCES = 2  # calibration sequences that gate and KVSplice training hold out to stop early on


class BestPerGroup:
    """Per-group early stopping for parameters stacked along dimension 0 (one group per layer and head).

    Groups are independent (each one's loss depends only on its own slice), so each keeps the
    parameters of its own lowest validation loss.
    """

    def __init__(self, module: torch.nn.Module, loss: torch.Tensor):
        self.loss = loss.detach().clone()
        self.state = {name: p.detach().clone() for name, p in module.named_parameters()}
        self.initial = self.loss.clone()

    def update(self, module: torch.nn.Module, loss: torch.Tensor) -> bool:
        """Take the current parameters of the groups whose loss improved; True if any did."""
        better = loss.detach() < self.loss
        self.loss = torch.where(better, loss.detach(), self.loss)
        for name, parameter in module.named_parameters():
            take = better.view(-1, *([1] * (parameter.dim() - 1)))
            self.state[name] = torch.where(take, parameter.detach(), self.state[name])
        return bool(better.any())

    def restore(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                parameter.copy_(self.state[name])

    @property
    def improved_groups(self) -> int:
        return int((self.loss < self.initial - 1e-9).sum())
