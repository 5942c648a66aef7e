"""A ResNet that also draws where the lesion is: tumour classes plus a coarse lesion map, learnt from masks.

A slice label tells a network one bit per image; a mask tells it which pixels. With 24 training patients per
fold, LGG's network learnt the patients rather than the lesions from labels alone. The lesion map is read from
every ResNet stage (a small feature pyramid) at a quarter of the input size, and its strongest responses join
the pooled features before the last layer, so a small FLAIR focus can carry the decision by itself.

Kept at module level (not built inside a function) because MLflow pickles the network with its class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import nn

LESION_EVIDENCE = 2  # the map's highest logit and the mean of its top 1 %


class LesionResNet(ResNet):
    """MONAI's ResNet (same layer names, so Grad-CAM and weight loading see the usual network) with a lesion map head."""

    def __init__(self, block_inplanes: list[int], map_width: int = 32, **resnet_args) -> None:
        super().__init__(block_inplanes=block_inplanes, **resnet_args)
        self.lateral = nn.ModuleList(nn.Conv2d(planes, map_width, kernel_size=1) for planes in block_inplanes)
        self.lesion_head = nn.Sequential(
            nn.Conv2d(map_width, map_width, kernel_size=3, padding=1),
            nn.GroupNorm(4, map_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(map_width, 1, kernel_size=1),
        )
        self.fc = nn.Linear(self.fc.in_features + LESION_EVIDENCE, self.fc.out_features)
        nn.init.constant_(self.fc.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(x)[0]

    def classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (N, classes) and lesion-map logits (N, 1, ~S/4, ~S/4)."""
        x = self.act(self.bn1(self.conv1(x)))
        if not self.no_max_pool:
            x = self.maxpool(x)
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            stages.append(x)
        lesion_map = self.lesion_head(self._pyramid(stages))
        flat = lesion_map.flatten(1)
        strongest = flat.topk(max(1, flat.shape[1] // 100), dim=1).values
        evidence = torch.stack([strongest[:, 0], strongest.mean(1)], dim=1)
        return self.fc(torch.cat([self.avgpool(x).flatten(1), evidence.to(x.dtype)], dim=1)), lesion_map

    def _pyramid(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """Top-down sum of every stage at the finest stage's size: deep context, fine position."""
        merged = self.lateral[-1](stages[-1])
        for lateral, stage in zip(self.lateral[-2::-1], stages[-2::-1]):
            merged = lateral(stage) + F.interpolate(merged, size=stage.shape[-2:], mode="nearest")
        return merged


def lesion_loss(lesion_map: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice of the lesion map against the masks' area per map cell, over the slices
    that have a mask (tumour-free slices with an empty mask count: they teach where no lesion is). Dice keeps a
    lesion of a few cells from drowning in the background's cells."""
    if not bool(has_mask.any()):
        return lesion_map.sum() * 0.0
    logits = lesion_map[has_mask].float()
    target = F.interpolate(masks[has_mask].float(), size=logits.shape[-2:], mode="area")
    cross_entropy = F.binary_cross_entropy_with_logits(logits, target)
    probability = torch.sigmoid(logits)
    dice = 1 - (2 * (probability * target).sum() + 1) / (probability.sum() + target.sum() + 1)
    return cross_entropy + dice
