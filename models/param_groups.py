"""Optimizer parameter groups with the original code's learning-rate multipliers (spec 7.2, 7.3; decisions 8-10).

Effective LR = base LR (0.1) x multiplier x the epoch's schedule factor; weight decay multiplier 1 everywhere.

    group                 what                                            Stage I   Stage II
    new_conv              image fc1/fc1_1, every text conv, text fc       0.1       0.1
    word2vec              the embedding table and its bias                1e-3      1e-3
    classifier_w / _b     the shared W and its bias                       0.01/0.02 0.01/0.02
    new_bn_w / new_bn_b   every new BatchNorm gamma / beta                0.2/0.1   0.2/0.1
    backbone_conv         pretrained conv filters (ResNet)                frozen    0.02
    backbone_conv1        the first conv filter                           frozen    1e-4
    backbone_bn_w / _b    pretrained BN gamma / beta (ResNet)             frozen    0.001 / 0.02
    backbone_w / _b       VGG filters (also fc6/fc7) / biases             frozen    0.001 / 0.02

Stage I freezes the whole backbone: no gradient, and its BatchNorm keeps normalising with batch statistics (train
mode) while its running statistics do not move (momentum 0). Stage II: backbone BN momentum 0.001.
"""
from __future__ import annotations

from torch import nn

from utils.cli import InvalidValue

from .dual_path import DualPath

NEW_MULTS = {"new_conv": 0.1, "word2vec": 1e-3, "classifier_w": 0.01, "classifier_b": 0.02,
             "new_bn_w": 0.2, "new_bn_b": 0.1}
RESNET_MULTS = {"backbone_conv": 0.02, "backbone_conv1": 1e-4, "backbone_bn_w": 0.001, "backbone_bn_b": 0.02}
VGG_MULTS = {"backbone_w": 0.001, "backbone_conv1": 1e-4, "backbone_b": 0.02}
BACKBONE_BN_MOMENTUM = {1: 0.0, 2: 0.001}
STAGES = (1, 2)


def _bn_modules(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


BACKBONE_BN = ("paper", "update")
UPDATE_BN_MOMENTUM = 0.1  # PyTorch's default, for ``backbone_bn="update"``


def set_stage(model: DualPath, stage: int, backbone_bn: str = "paper") -> None:
    """Freeze (Stage I) or unfreeze (Stage II) the image backbone, including its BN running statistics.

    ``backbone_bn="paper"``: Stage I keeps the backbone's BN statistics (momentum 0), Stage II moves them with
    momentum 0.001. ``"update"`` (not the paper) uses momentum 0.1 in both stages; it exists for a randomly
    initialised backbone, whose "running statistics" (0 and 1) are placeholders: kept, the backbone would normalise
    with batch statistics in training and with 0/1 at test time, and in Stage II its fast-changing weights would
    outrun statistics that move at 0.001 (ImageNet statistics of slowly fine-tuned weights have neither problem)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if backbone_bn not in BACKBONE_BN:
        raise ValueError(f"backbone_bn must be one of {list(BACKBONE_BN)}, got {backbone_bn!r}")
    model.image.backbone.requires_grad_(stage == 2)
    momentum = UPDATE_BN_MOMENTUM if backbone_bn == "update" else BACKBONE_BN_MOMENTUM[stage]
    for bn in _bn_modules(model.image.backbone):
        bn.momentum = momentum


def _classify(model: DualPath) -> dict[str, list[nn.Parameter]]:
    groups: dict[str, list[nn.Parameter]] = {}

    def add(name: str, p: nn.Parameter | None) -> None:
        if p is not None:
            groups.setdefault(name, []).append(p)

    add("classifier_w", model.classifier.weight)
    add("classifier_b", model.classifier.bias)
    add("word2vec", model.text.embed.weight)
    add("word2vec", model.text.embed_bias)
    backbone = model.image.backbone
    backbone_ids = {id(p) for p in backbone.parameters()}
    skip = backbone_ids | {id(model.text.embed.weight), id(model.text.embed_bias)}
    for part in (model.image, model.text):
        for m in part.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m.weight) not in backbone_ids:
                add("new_bn_w", m.weight)
                add("new_bn_b", m.bias)
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and id(m.weight) not in skip:
                add("new_conv", m.weight)
                if m.bias is not None:
                    raise AssertionError(f"new layer {m} should have no bias (spec section 5)")
    is_vgg = model.image.arch.startswith("vgg")
    first_conv = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d))
    for m in backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            add("backbone_bn_w", m.weight)
            add("backbone_bn_b", m.bias)
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            if m is first_conv:
                add("backbone_conv1", m.weight)
            else:
                add("backbone_w" if is_vgg else "backbone_conv", m.weight)
            if m.bias is not None:
                add("backbone_b", m.bias)  # VGG biases; (the Caffe ResNet conv1 bias does not exist in torchvision)
    return groups


GROUPS = tuple(dict.fromkeys([*NEW_MULTS, *RESNET_MULTS, *VGG_MULTS]))


def check_lr_mults(lr_mults: dict, stage: int) -> None:
    """Reject an override of an unknown group, a negative multiplier, or a backbone multiplier in Stage I."""
    for name, mult in lr_mults.items():
        if name not in GROUPS:
            raise InvalidValue(f"lr_mults: unknown parameter group {name!r}; valid groups: {list(GROUPS)}")
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or mult < 0:
            raise InvalidValue(f"lr_mults: {name} must be a number >= 0, got {mult!r}")
        if stage == 1 and name.startswith("backbone"):
            raise InvalidValue(f"lr_mults: {name} is a backbone group, frozen in Stage I; set it for Stage II")


def param_groups(model: DualPath, stage: int, base_lr: float = 0.1, weight_decay: float = 1e-4,
                 backbone_bn: str = "paper", lr_mults: dict | None = None) -> list[dict]:
    """Groups for ``torch.optim.SGD(groups, momentum=0.9, nesterov=True)``. Each carries ``name`` and
    ``lr_mult``; ``lr`` = base_lr x lr_mult. Stage I leaves the backbone out (frozen). Calls ``set_stage``.
    ``lr_mults`` replaces the paper's multiplier of the groups it names (e.g. ``{"backbone_conv": 0.5}``
    for a randomly initialised backbone, which the paper's 0.02 would leave almost untrained)."""
    check_lr_mults(lr_mults or {}, stage)
    set_stage(model, stage, backbone_bn)
    mults = dict(NEW_MULTS)
    if stage == 2:
        mults.update(VGG_MULTS if model.image.arch.startswith("vgg") else RESNET_MULTS)
        mults.setdefault("backbone_b", 0.02)
    mults.update({k: float(v) for k, v in (lr_mults or {}).items()})
    classified = _classify(model)
    absent = sorted(set(lr_mults or {}) - set(classified))
    if absent:  # e.g. a VGG group for a ResNet: it would silently change nothing
        raise InvalidValue(f"lr_mults: {absent} not a parameter group of this {model.image.arch} model; its groups: "
                         f"{sorted(classified)}")
    all_params = {id(p) for p in model.parameters()}
    seen = {id(p) for ps in classified.values() for p in ps}
    if seen != all_params:
        raise AssertionError(f"{len(all_params - seen)} parameters fell into no group")
    groups = []
    for name, params in classified.items():
        if name not in mults:
            continue  # a backbone group in Stage I: frozen
        groups.append({"params": params, "name": name, "lr_mult": mults[name], "lr": base_lr * mults[name],
                       "weight_decay": weight_decay})
    return groups
