"""Networks trained alike from different seeds, answering as one.

On a small or hard data set one network's ranking of its least certain slices moves from seed to seed (on
Masoud, two 30-minute runs of one preset missed 2 and 14 tumours at specificity 0.995); the mean of several
networks' probabilities moves less. Kept at module level (not built inside a function) because MLflow pickles
the network with its class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Ensemble(nn.Module):
    """The members' mean class probability, returned as its log (so softmax, the temperature and the mirror
    average downstream treat it as logits), and their mean lesion map where they draw one."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(x)[0]

    def classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        outputs = [member.classify(x) if hasattr(member, "classify") else (member(x), None) for member in self.members]
        log_probabilities = torch.stack([F.log_softmax(logits.float(), dim=1) for logits, _ in outputs])
        maps = [lesion_map for _, lesion_map in outputs if lesion_map is not None]
        mean_map = torch.stack(maps).mean(0) if maps else None
        return torch.logsumexp(log_probabilities, dim=0) - math.log(len(outputs)), mean_map
