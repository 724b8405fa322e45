"""ResNet-18/50 for 32x32 inputs (He et al., 2016), CIFAR style, with Random Mask slots.

Blocks as the paper counts them: 1 = stem conv, 2-5 = layer1-4; shallow = blocks 1-3.
Every conv's BatchNorm output in a masked part is masked before its ReLU; a residual branch's
last one before the add, projection shortcuts included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rm_sweep.models.registry import LayerPlan, register_model

PARTS_OF_LAYERS = ("shallow", "shallow", "deep", "deep")


def _shortcut(in_planes: int, out_planes: int, stride: int, plan: LayerPlan, part: str) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes), plan.masker(part)
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, plan: LayerPlan, part: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.mask1 = plan.masker(part)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.mask2 = plan.masker(part)
        self.shortcut = _shortcut(in_planes, planes, stride, plan, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.mask1(self.bn1(self.conv1(x))))
        out = self.mask2(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, plan: LayerPlan, part: str) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.mask1 = plan.masker(part)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.mask2 = plan.masker(part)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.mask3 = plan.masker(part)
        self.shortcut = _shortcut(in_planes, out_planes, stride, plan, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.mask1(self.bn1(self.conv1(x))))
        out = F.relu(self.mask2(self.bn2(self.conv2(out))))
        out = self.mask3(self.bn3(self.conv3(out)))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Input: normalised images (N, C, H, W); output logits (N, num_classes)."""

    def __init__(self, block: type[nn.Module], num_blocks: list[int], plan: LayerPlan,
                 in_channels: int, num_classes: int) -> None:
        super().__init__()
        stem = plan.channels(64, "shallow")
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.mask1 = plan.masker("shallow")
        in_planes, layers = stem, []
        for i, (base, n, part) in enumerate(zip((64, 128, 256, 512), num_blocks, PARTS_OF_LAYERS)):
            planes = plan.channels(base, part)
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, planes, 2 if (i > 0 and j == 0) else 1, plan, part))
                in_planes = planes * block.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.mask1(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model("resnet18")
def resnet18(plan: LayerPlan, in_channels: int, num_classes: int) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], plan, in_channels, num_classes)


@register_model("resnet50")
def resnet50(plan: LayerPlan, in_channels: int, num_classes: int) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], plan, in_channels, num_classes)
