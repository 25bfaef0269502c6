"""Every paper row's recipe (configs/*_stage{1,2}.yaml): its values against the spec (sections 4, 6.1, 6.3, 7.4),
its --compare-paper row, and the model it builds (VGG head of spec 4.2 / decision 15, the VGG even/odd LR rule of
spec 7.3, the ResNet-152 build of decision 16).

Full-size models are built with ``pretrained: none``; the weight initialisers of torchvision (~100 M VGG fc6
weights) are skipped (``fast_init``) where only the structure is checked."""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
import torch
from torch import nn

import models  # noqa: F401  (torchvision guard first)
from engine.config import load_config
from engine.model_io import make_model
from engine.paper import load_paper_rows
from models import param_groups
from models.text_cnn import Bottleneck

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# file stem -> (arch, text_depth, dropout, W bias, schedule, (lambda_rank, img, txt), negatives, paper row or None)
RECIPES = {
    "flickr30k_stage1": ("resnet50", "res50", 0.75, True, [[240, 1.0]], (0, 1, 1), None, "flickr30k/resnet50/stage1"),
    "flickr30k_stage2": ("resnet50", "res50", 0.75, True, [[40, 1.0], [20, 0.1]], (2, 1, 0.1), "hard",
                         "flickr30k/resnet50/stage2"),
    "flickr30k_vgg19_stage1": ("vgg19", "res50", 0.75, False, [[240, 1.0]], (0, 1, 1), None, "flickr30k/vgg19/stage1"),
    "flickr30k_vgg19_stage2": ("vgg19", "res50", 0.75, False, [[40, 1.0], [20, 0.1]], (2, 1, 0.1), "hard",
                               "flickr30k/vgg19/stage2"),
    "flickr30k_resnet152_stage1": ("resnet152", "res152", 0.75, True, [[240, 1.0]], (0, 1, 1), None,
                                   "flickr30k/resnet152/stage1"),
    "flickr30k_resnet152_stage2": ("resnet152", "res152", 0.75, True, [[60, 1.0], [20, 0.1]], (2, 1, 0.1), "hard",
                                   "flickr30k/resnet152/stage2"),
    "coco_stage1": ("resnet50", "res50", 0.5, False, [[75, 1.0]], (0, 1, 1), None, None),
    "coco_stage2": ("resnet50", "res50", 0.5, False, [[15, 1.0], [5, 0.1]], (2, 1, 0.1), "hard",
                    "coco/resnet50/stage2/5k"),
    "coco_vgg19_stage1": ("vgg19", "res50", 0.5, False, [[70, 1.0]], (0, 1, 1), None, None),
    "coco_vgg19_stage2": ("vgg19", "res50", 0.5, False, [[15, 1.0], [5, 0.1]], (2, 1, 0.1), "hard", None),
    "cuhk_pedes_stage1": ("resnet50", "res50", 0.8, True, [[150, 1.0]], (0, 1, 1), None, "cuhk-pedes/resnet50/stage1"),
    "cuhk_pedes_stage2": ("resnet50", "res50", 0.8, True, [[40, 1.0], [20, 0.1]], (2, 1, 0.5), "random",
                          "cuhk-pedes/resnet50/stage2"),
    "cuhk_pedes_vgg16_stage1": ("vgg16", "res50", 0.8, True, [[120, 1.0]], (0, 1, 1), None, "cuhk-pedes/vgg16/stage1"),
    "cuhk_pedes_vgg16_stage2": ("vgg16", "res50", 0.8, True, [[40, 1.0], [20, 0.1]], (2, 1, 0.5), "random",
                                "cuhk-pedes/vgg16/stage2"),
}
VGG_PARAMS = {"vgg16": 30, "vgg19": 36}  # the original's Stage II loop bound: (13 or 16 convs + fc6 + fc7) x 2
RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet152": (3, 8, 36, 3)}
TEXT_BLOCKS = {"res50": (3, 4, 6, 1), "res152": (3, 8, 36, 3)}


def stage_of(stem: str) -> int:
    return int(stem[-1])


def test_every_recipe_file_is_listed() -> None:
    files = {p.stem for p in CONFIGS.glob("*_stage[12].yaml")}
    assert files == set(RECIPES), f"configs without an expected row here: {files ^ set(RECIPES)}"


@pytest.mark.parametrize("stem", sorted(RECIPES))
def test_recipe_values(stem: str) -> None:
    arch, depth, dropout, bias, schedule, lambdas, negatives, _ = RECIPES[stem]
    cfg = load_config(CONFIGS / f"{stem}.yaml", stage=stage_of(stem))
    assert (cfg.arch, cfg.text_depth, cfg.dropout, cfg.classifier_bias) == (arch, depth, dropout, bias)
    assert cfg.lr_schedule == schedule and cfg.base_lr == 0.1 and cfg.batch_size == 32
    assert (cfg.momentum, cfg.nesterov, cfg.weight_decay) == (0.9, True, 1e-4)
    assert (cfg.lambda_rank, cfg.lambda_img, cfg.lambda_txt) == lambdas
    assert cfg.margin == 1.0 and cfg.position_shift and cfg.text_pool == "max" and cfg.train_crop == 224
    assert cfg.precision == "fp32" and cfg.ranking_loss == "paper" and cfg.pretrained == "imagenet"
    if negatives is not None:
        assert cfg.negatives == negatives and cfg.num_candidates == 256


@pytest.mark.parametrize("stem", sorted(RECIPES))
def test_recipe_names_its_paper_row(stem: str) -> None:
    row = RECIPES[stem][-1]
    text = (CONFIGS / f"{stem}.yaml").read_text()
    assert "Paper row:" in text
    if row is not None:
        rows = load_paper_rows()
        assert row in rows and f"= {row}" in text
        assert rows[row]["dataset"].replace("-", "_") == stem.split("_stage")[0].split("_vgg")[0].split(
            "_resnet")[0]


def test_every_table1_and_table5_row_has_a_recipe() -> None:
    named = {r[-1] for r in RECIPES.values()}
    table_rows = [k for k, r in load_paper_rows().items() if r["description"].startswith(("Table 1", "Table 5"))]
    assert len(table_rows) == 10 and set(table_rows) <= named


@contextmanager
def fast_init() -> Iterator[None]:
    """Skip torchvision's random initialisers (structure-only checks); our own heads still initialise."""
    names = ("kaiming_normal_", "kaiming_uniform_", "normal_", "uniform_", "constant_")  # BN's ones_/zeros_ stay
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


class TinyData(SimpleNamespace):
    """What make_model reads from a prepared directory (a small class count and vocabulary: W's size is data)."""

    def word2vec(self) -> torch.Tensor:
        return torch.randn(self.vocab_size, 300)


DATA = TinyData(num_classes=7, vocab_size=40, max_len=32)


def build(stem: str, **overrides) -> tuple[nn.Module, object]:
    cfg = load_config(CONFIGS / f"{stem}.yaml", {"pretrained": "none", **overrides}, stage=stage_of(stem))
    with fast_init():
        model, _ = make_model(cfg, DATA, None)
    return model, cfg


@pytest.mark.parametrize("stem", ["flickr30k_vgg19_stage2", "coco_vgg19_stage1", "cuhk_pedes_vgg16_stage2",
                                  "flickr30k_resnet152_stage1", "cuhk_pedes_stage2"])
def test_recipe_builds_its_model(stem: str) -> None:
    arch, depth, dropout, bias, *_ = RECIPES[stem]
    model, cfg = build(stem)
    img = model.image
    assert img.arch == arch and img.dropout.p == dropout and model.text.dropout.p == dropout
    assert (model.classifier.bias is not None) == bias
    assert model.classifier.in_features == 2048 and model.classifier.out_features == DATA.num_classes
    hidden = 4096 if arch.startswith("vgg") else 2048
    assert (img.fc1.in_channels, img.fc1.out_channels, img.fc1_1.in_channels, img.fc1_1.out_channels) == (
        hidden, hidden, hidden, 2048)
    assert img.fc1.bias is None and img.fc1_1.bias is None
    blocks = [m for m in model.text.blocks if isinstance(m, Bottleneck)]
    assert len(blocks) == sum(TEXT_BLOCKS[depth])
    groups = param_groups(model, cfg.stage)
    n_params = sum(p.numel() for g in groups for p in g["params"])
    trainable = sum(p.numel() for p in model.parameters() if cfg.stage == 2 or not any(
        p is q for q in img.backbone.parameters()))
    assert n_params == trainable


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_vgg_backbone_is_fully_convolutional_and_ends_at_prerelu_fc7(arch: str) -> None:
    model, _ = build("cuhk_pedes_vgg16_stage1" if arch == "vgg16" else "flickr30k_vgg19_stage1")
    bb = model.image.backbone
    convs = [m for m in bb.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == {"vgg16": 13, "vgg19": 16}[arch]
    assert (bb.fc6.in_channels, bb.fc6.out_channels, bb.fc6.kernel_size) == (512, 4096, (7, 7))
    assert (bb.fc7.in_channels, bb.fc7.out_channels, bb.fc7.kernel_size) == (4096, 4096, (1, 1))
    assert isinstance(model.image.pool, nn.Identity)
    # pre-ReLU fc7: a negative fc7 bias with zero input must come out negative (no ReLU after fc7)
    with torch.no_grad():
        x = torch.zeros(1, 512, 7, 9)  # pool5 map of a 224 x 288 image
        for p in (bb.fc6.weight, bb.fc6.bias, bb.fc7.weight):
            p.zero_()
        bb.fc7.bias.fill_(-1.0)
        out = bb.fc7(torch.relu(bb.fc6(x)))
    assert out.shape == (1, 4096, 1, 3) and (out == -1.0).all()


def test_vgg_fc6_fc7_convolutions_equal_the_linear_layers_they_come_from() -> None:
    """VGGBackbone copies torchvision's fc6/fc7 Linear weights into convolutions: at every 7x7 window the conv
    equals the Linear on the flattened window (the layout a pretrained state dict relies on)."""
    import torchvision

    from models.image_cnn import VGGBackbone
    torch.manual_seed(0)
    with fast_init():
        vgg = torchvision.models.vgg11(weights=None)  # same classifier as VGG-16/19, cheaper features
    with torch.no_grad():
        for layer in (vgg.classifier[0], vgg.classifier[3]):
            layer.weight.normal_(0, 0.01)
            layer.bias.normal_(0, 0.1)
    bb = VGGBackbone(vgg).eval()
    x = torch.randn(1, 512, 7, 8)
    with torch.no_grad():
        conv = bb.fc7(torch.relu(bb.fc6(x)))  # (1, 4096, 1, 2)
        for j in range(2):
            flat = x[:, :, :, j:j + 7].flatten(1)
            lin = vgg.classifier[3](torch.relu(vgg.classifier[0](flat)))
            assert torch.allclose(conv[:, :, 0, j], lin, atol=1e-4)


@pytest.mark.parametrize("arch, stem", [("vgg16", "cuhk_pedes_vgg16_stage2"), ("vgg19", "flickr30k_vgg19_stage2")])
def test_vgg_stage2_lr_multipliers_follow_the_even_odd_rule(arch: str, stem: str) -> None:
    """Spec 7.3: the original's loop over the backbone parameters in MatConvNet order (conv1_1 filter, conv1_1
    bias, ..., fc6 f/b, fc7 f/b): even index -> 0.02, odd -> 0.001, then params(1) -> 1e-4."""
    model, cfg = build(stem)
    mult = {id(p): g["lr_mult"] for g in param_groups(model, 2) for p in g["params"]}
    backbone = list(model.image.backbone.named_parameters())  # torchvision order = MatConvNet order
    assert len(backbone) == VGG_PARAMS[arch]
    for i, (name, p) in enumerate(backbone, 1):
        expected = 1e-4 if i == 1 else 0.02 if i % 2 == 0 else 0.001
        assert mult[id(p)] == expected, (i, name)
        assert name.endswith("bias") == (i % 2 == 0)
    stage1 = {id(p) for g in param_groups(model, 1) for p in g["params"]}
    assert not stage1 & {id(p) for _, p in backbone}  # Stage I: frozen


def test_resnet152_build_decision_16() -> None:
    """Decision 16: torchvision ResNet-152 (3, 8, 36, 3 bottlenecks) with the ResNet-50 head; text CNN res152."""
    model, cfg = build("flickr30k_resnet152_stage2")
    stages = [m for m in model.image.backbone if isinstance(m, nn.Sequential)]
    assert tuple(len(s) for s in stages) == RESNET_BLOCKS["resnet152"]
    assert model.image.fc1.in_channels == 2048 and isinstance(model.image.pool, nn.AvgPool2d)
    assert model.text.depth == "res152"
    widths = [(b.branch[0].in_channels, b.branch[-1].num_features) for b in model.text.blocks]
    assert widths[2] == (256, 256) and widths[3] == (256, 512) and widths[-1] == (2048, 2048)
    resnet50, _ = build("flickr30k_stage2")
    assert tuple(len(s) for s in resnet50.image.backbone if isinstance(s, nn.Sequential)) == RESNET_BLOCKS["resnet50"]


@pytest.mark.parametrize("stem, size", [("cuhk_pedes_vgg16_stage1", 224), ("flickr30k_resnet152_stage1", 64)])
def test_one_full_size_forward(stem: str, size: int) -> None:
    """A real forward of the full-size network (VGG needs 224 px: fc6 is a 7x7 window of pool5)."""
    torch.manual_seed(0)
    model, _ = build(stem, train_crop=size) if size != 224 else build(stem)
    for p in model.image.backbone.parameters():  # fast_init left them uninitialised
        nn.init.normal_(p, std=0.01)
    model.eval()
    tokens = torch.randint(0, DATA.vocab_size + 1, (2, DATA.max_len))
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size), tokens)
    assert out["img_feature"].shape == (1, 2048) and out["txt_feature"].shape == (2, 2048)
    assert out["img_logits"].shape == (1, DATA.num_classes) and torch.isfinite(out["img_logits"]).all()
    assert math.isfinite(out["txt_logits"].sum().item())


def test_fp32_recipes_allow_tf32_on_cuda_only() -> None:
    """Precision, fidelity first: fp32 on a CUDA device lets matmuls use TF32 ("high"); CPU and bf16 leave the
    global setting alone. (torch.device("cuda") needs no GPU to be named.)"""
    from engine.encode import allow_tf32
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not allow_tf32(torch.device("cpu"), "fp32")
        assert not allow_tf32(torch.device("cuda"), "bf16")
        assert torch.get_float32_matmul_precision() == "highest"
        assert allow_tf32(torch.device("cuda"), "fp32")
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)
