"""SENet-18, pre-activation version (Hu et al., 2017), for 32x32 inputs, with Random Mask slots.

ResNet-18's layout with pre-activation squeeze-and-excitation blocks; shallow = stem, layer1,
layer2, deep = layer3-4. As the authors' ``senet_drop_012_05.py``: both BatchNorm outputs of
every block of a masked part are masked before their ReLU, and the stem is not (layer1's first
BatchNorm normalises and masks its output): 8 masks shallow. The authors masked no deep SENet;
the deep part follows the same rule (8 masks). A resized shallow part gives layer1's first block
a 1x1 projection shortcut, the ResNet skeleton's rule (see ``resnet.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rm_sweep.models.registry import LayerPlan, register_model
from rm_sweep.models.resnet import ResNet


class PreActSEBlock(nn.Module):
    """BN-mask-ReLU-conv3x3 twice, then squeeze-and-excitation, plus the shortcut.

    Input (N, in_planes, H, W); output (N, planes, H / stride, W / stride).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, plan: LayerPlan, part: str, project: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.mask1 = plan.masker(part)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.mask2 = plan.masker(part)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if project or stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
        # Squeeze-and-excitation with reduction 16, as 1x1 convs on the pooled map.
        self.fc1 = nn.Conv2d(planes, max(1, planes // 16), 1)
        self.fc2 = nn.Conv2d(max(1, planes // 16), planes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.mask1(self.bn1(x)))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.mask2(self.bn2(out))))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(out, 1)))))
        return out * w + shortcut


@register_model("senet18", revision=2)
def senet18(plan: LayerPlan, in_channels: int, num_classes: int) -> ResNet:
    # kuangliu's SENet is ResNet-18's skeleton (stem conv-BN-ReLU, four stages, linear) with
    # pre-activation SE blocks, so it shares the ResNet class.
    return ResNet(PreActSEBlock, [2, 2, 2, 2], plan, in_channels, num_classes, mask_stem=False)
