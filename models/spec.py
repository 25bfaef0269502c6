"""The network's architecture as plain data: block counts, widths, BatchNorm epsilons and the state-dict names of
every block, per architecture. ``models/`` builds its modules from it, the MatConvNet converter maps the original
files' parameters onto these names, and the tests' synthetic MatConvNet files (``tests/matconvnet_fixtures.py``)
take their sizes from it, so a width or a block count is written once. This module imports only the standard
library (``tests/test_models.py`` checks it); ``import models.spec`` still runs ``models/__init__.py`` (torch).

    Caffe ResNet (the original backbone, ``models/caffe_resnet.py``; torchvision's names)
        conv1 (7x7/2, bias) -> bn1 -> relu -> maxpool -> layer1..layer4 of ``RESNET_BLOCKS[arch]`` bottlenecks
        block ``layer{i}.{k}``: conv1/bn1 (1x1, stride here), conv2/bn2 (3x3), conv3/bn3 (1x1), and in block 0
        downsample.0/downsample.1 (the projection); widths 64w * 2^(i-1) (mid) and 4x that (out)
    text CNN (``models/text_cnn.py``), ``TEXT_STAGES[depth]``: per stage (blocks, projection bottleneck, out, stride)
        block ``text.blocks.{k}``: branch.0/branch.1 (1x1), branch.3.conv/branch.4 (1x2, stride), branch.6/branch.7
        (1x1), and in a stage's first block shortcut.0/shortcut.1; widths max(4, round(c * text_width))
    DualPath (``models/dual_path.py``): image.backbone (``BACKBONE_SEQUENCE``), image.fc1/fc1_bn, image.fc1_1/
        fc1_1_bn; text.embed (+ text.embed_bias), text.embed_bn, text.blocks, text.fc/fc_bn; classifier (the ONE W)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# ------------------------------------------------------------------------------------------------ image CNN
RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet152": (3, 8, 36, 3)}  # bottlenecks per stage (layer1..layer4)
RESNET_STEM = 64  # conv1's width (x backbone_width)
EXPANSION = 4  # a bottleneck's output is 4x its middle width
CAFFE_BN_EPS = 1e-5  # Caffe's BatchNorm default, which the converted ImageNet file stores (read from the file)
BACKBONE_SEQUENCE = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")  # image.backbone.N
CAFFE_BOTTLENECK = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))  # branch2a (stride), 2b (3x3), 2c
CAFFE_PROJECTION = ("downsample.0", "downsample.1")  # branch1

# ------------------------------------------------------------------------------------------------ text CNN
EMBED_DIM = 300  # word2vec
TEXT_STAGES: dict[str, tuple[tuple[int, int, int, int], ...]] = {  # (blocks, projection mid, out, stride)
    "res50": ((3, 128, 256, 1), (4, 512, 512, 2), (6, 1024, 1024, 2), (1, 2048, 2048, 1)),
    # Spec 10.16: the "ResNet-152 dagger" text CNN paired with the ResNet-152 image CNN is not in the original
    # repository; its depth is unknown. This variant is a GUESS with ResNet-152's block counts (3, 8, 36, 3).
    "res152": ((3, 128, 256, 1), (8, 512, 512, 2), (36, 1024, 1024, 2), (3, 2048, 2048, 1)),
}
TEXT_BRANCH = (("branch.0", "branch.1"), ("branch.3.conv", "branch.4"), ("branch.6", "branch.7"))  # 1x1, 1x2, 1x1
TEXT_SHORTCUT = ("shortcut.0", "shortcut.1")
MIN_TEXT_WIDTH = 4

# ------------------------------------------------------------------------------------------------ new layers
NEW_BN_EPS = 1e-3  # decision 20: every BN the authors added (their modified dagnn.BatchNorm default)
NEW_BN_MOMENTUM = 0.05  # spec 7.2: moving-average rate of the new BNs
IMAGE_HEAD = (("image.fc1", "image.fc1_bn"), ("image.fc1_1", "image.fc1_1_bn"))  # 1x1 convs + BN, on pool5
TEXT_EMBED, TEXT_EMBED_BIAS, TEXT_EMBED_BN = "text.embed", "text.embed_bias", "text.embed_bn"
TEXT_FC = ("text.fc", "text.fc_bn")  # after the pooling over positions
CLASSIFIER = "classifier"  # the shared W


@dataclass(frozen=True)
class Block:
    """One bottleneck: its state-dict prefix, place (stage, index within the stage, both 0-based), widths, stride and
    whether it has a projection shortcut."""
    key: str
    stage: int
    index: int
    cin: int
    mid: int
    cout: int
    stride: int
    projection: bool


def resnet_stem(width: float = 1.0) -> int:
    """conv1's output channels at ``width`` (1.0 = the real network; less only for the converter's test files)."""
    return max(1, round(RESNET_STEM * width))


def resnet_blocks(arch: str, width: float = 1.0) -> list[Block]:
    """Every bottleneck of the Caffe ResNet ``arch``, in order; keys ``layer{i}.{k}`` (torchvision's)."""
    base = resnet_stem(width)
    cin, out = base, []
    for i, n in enumerate(RESNET_BLOCKS[arch]):
        mid = base * 2 ** i
        for k in range(n):
            out.append(Block(f"layer{i + 1}.{k}", i, k, cin, mid, mid * EXPANSION, 2 if (k == 0 and i > 0) else 1,
                             k == 0))
            cin = mid * EXPANSION
    return out


def text_width(channels: int, width: float) -> int:
    """A text stage width ``channels`` scaled by ``width`` (1.0 = the paper)."""
    return max(MIN_TEXT_WIDTH, round(channels * width))


def text_blocks(depth: str, width: float = 1.0, embed_dim: int = EMBED_DIM) -> list[Block]:
    """Every bottleneck of the text CNN ``depth``, in order; keys ``text.blocks.{k}``. A stage's first block projects
    (its middle width is the table's), the others are identity blocks of middle width out/4."""
    cin, out = embed_dim, []
    for i, (n, proj_mid, cout, stride) in enumerate(TEXT_STAGES[depth]):
        proj_mid, cout = text_width(proj_mid, width), text_width(cout, width)
        for k in range(n):
            out.append(Block(f"text.blocks.{len(out)}", i, k, cin, proj_mid if k == 0 else cout // 4, cout,
                             stride if k == 0 else 1, k == 0))
            cin = cout
    return out


def text_downsample(depth: str) -> int:
    """How much the text CNN shortens a sentence (max_len must be a multiple of it)."""
    return math.prod(stride for *_, stride in TEXT_STAGES[depth])
