"""Ensembles of models by averaged logits (the paper's "EN": five masks, same settings)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rm_sweep.errors import UserError


class Ensemble(nn.Module):
    """An ``nn.Module`` whose logits are the mean of its members' logits.

    Members take (N, C, H, W) in [0, 1] and return logits (N, K); so does the ensemble, which
    makes it attackable like any single model (gradients flow through every member).
    """

    combine = "mean_logits"  # how members are combined, for the store's ensembles table

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(models) == 0:
            raise UserError("an ensemble needs at least one model")
        self.members = nn.ModuleList(models)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the members' logits: (N, C, H, W) in [0, 1] -> (N, K)."""
        logits = self.members[0](images)
        for member in self.members[1:]:
            logits = logits + member(images)
        return logits / len(self.members)
