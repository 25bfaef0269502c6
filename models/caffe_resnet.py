"""The original Caffe ResNet (He et al.'s prototxt, as MatConvNet imported it into ``imagenet-resnet-50-dag.mat``).

The paper's Stage I starts from MatConvNet's ``imagenet-resnet-50-dag.mat``, a conversion of the Caffe ResNet-50,
not torchvision's. The weight shapes are the same, so loading cannot catch the differences; the structure must make
them (``../shared/reference/matconvnet_models.md`` section 3):

    torchvision                                  Caffe / MatConvNet (this module)
    conv1 7x7/2, no bias                         conv1 7x7/2 WITH a bias
    maxpool 3x3/2, padding 1                     pool1 3x3/2, no padding, ceil rounding (MatConvNet pad [0 1 0 1]
                                                 with padded cells ignored: the same windows)
    stride 2 in the 3x3 conv2 of a stage's       stride 2 in the first 1x1 conv1 (res{3,4,5}a_branch2a);
    first block                                  the 3x3 always has stride 1
    BN eps 1e-5                                  BN eps as stored in the file (block.epsilon; 1e-5 expected)
    input [0, 1] RGB, ImageNet mean/std          input 0-255 RGB minus a mean, no std (``ImageCNN.normalize``)

The module and parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
...; the block counts, widths and names are ``models/spec.py``'s), so a converted state dict reads like a torchvision
one plus ``conv1.bias``. ``width`` < 1 scales every stage
width; it exists only for the converter's small test files (1.0 = the real network).
"""
from __future__ import annotations

from torch import nn

from utils.cli import InvalidValue

from . import spec


class CaffeBottleneck(nn.Module):
    """1x1 (stride s) -> BN -> ReLU -> 3x3 -> BN -> ReLU -> 1x1 -> BN, plus shortcut, sum, ReLU."""

    def __init__(self, block: spec.Block, eps: float) -> None:
        super().__init__()
        cin, mid, cout, stride = block.cin, block.mid, block.cout, block.stride
        self.conv1 = nn.Conv2d(cin, mid, 1, stride=stride, bias=False)  # res{S}{b}_branch2a: the stride is HERE
        self.bn1 = nn.BatchNorm2d(mid, eps=eps)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=1, padding=1, bias=False)  # branch2b
        self.bn2 = nn.BatchNorm2d(mid, eps=eps)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)  # branch2c
        self.bn3 = nn.BatchNorm2d(cout, eps=eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),  # branch1
                                         nn.BatchNorm2d(cout, eps=eps))
                           if block.projection else None)

    def forward(self, x):  # (N, cin, H, W) -> (N, 4 mid, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class CaffeResNet(nn.Module):
    """conv1 (bias) -> bn1 -> ReLU -> pool1 -> layer1..layer4 (``models.spec.resnet_blocks``); ``out_channels`` =
    2048 x width."""

    def __init__(self, arch: str = "resnet50", eps: float = spec.CAFFE_BN_EPS, width: float = 1.0) -> None:
        super().__init__()
        if arch not in spec.RESNET_BLOCKS:
            raise InvalidValue(f"the caffe-style backbone exists for {sorted(spec.RESNET_BLOCKS)}, not {arch!r}")
        base = spec.resnet_stem(width)
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=True)
        self.bn1 = nn.BatchNorm2d(base, eps=eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=0, ceil_mode=True)
        blocks = spec.resnet_blocks(arch, width)
        for i in range(len(spec.RESNET_BLOCKS[arch])):
            layer = f"layer{i + 1}"
            setattr(self, layer, nn.Sequential(*[CaffeBottleneck(b, eps) for b in blocks
                                                 if b.key.split(".")[0] == layer]))
        self.out_channels = blocks[-1].cout
