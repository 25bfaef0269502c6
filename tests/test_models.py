"""Tests for models.dual_path (the shared W, spec 6.1), models/spec.py, mixed precision, the torchvision guard, and one
full-size forward/backward (slow; how long it takes is bench/'s, BENCHMARKS.md sections 1 and 5: no test asserts a
wall-clock time)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from models import build_model, instance_loss, total_loss

ROOT = Path(__file__).resolve().parents[1]
V, N_CLASSES, MAX_LEN = 30, 7, 8


@pytest.fixture(scope="module")
def small() -> models.DualPath:
    torch.manual_seed(0)
    return build_model(num_classes=N_CLASSES, vocab_size=V, max_len=MAX_LEN, word2vec=None, arch="resnet18",
                       pretrained="none", image_pool=4)


def batch(b: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 112, 112, generator=g)
    tokens = torch.randint(1, V + 1, (b, MAX_LEN), generator=g)
    tokens[1, 3:] = 0
    return images, tokens, torch.arange(b) % N_CLASSES


# -------------------------------------------------------------------------------------------- shared W, 6.1

def test_one_shared_classifier(small: models.DualPath) -> None:
    assert isinstance(small.classifier, nn.Linear)
    assert small.classifier.weight.shape == (N_CLASSES, 2048)
    assert small.classifier.bias is not None and torch.equal(small.classifier.bias, torch.zeros(N_CLASSES))
    shaped = [n for n, p in small.named_parameters() if p.shape == (N_CLASSES, 2048)]
    assert shaped == ["classifier.weight"]
    bound = 0.1 * (3.0 / 2048) ** 0.5  # spec 7.2: 0.1 x Uniform(+-sqrt(3/2048))
    assert small.classifier.weight.abs().max() <= bound
    assert small.classifier.weight.abs().max() > 0.8 * bound
    other = build_model(num_classes=3, vocab_size=V, max_len=MAX_LEN, word2vec=None, arch="resnet18",
                        pretrained="none", image_pool=3, classifier_bias=False, dropout=0.5, text_pool="avg")
    assert other.classifier.bias is None  # MSCOCO / VGG-19 variants have no classifier bias (spec 6.1)
    assert other.image.dropout.p == other.text.dropout.p == 0.5
    assert other.text.pool == "avg" and other.image.pool.kernel_size == 3


def test_both_paths_use_the_same_w(small: models.DualPath) -> None:
    small.eval()
    images, tokens, _ = batch()
    with torch.no_grad():
        out = small(images, tokens)
    w, b = small.classifier.weight, small.classifier.bias
    assert torch.allclose(out["img_logits"], out["img_rank"] @ w.T + b, atol=1e-5)  # eval: dropout is identity
    assert torch.allclose(out["txt_logits"], out["txt_rank"] @ w.T + b, atol=1e-5)
    assert set(out) == {"img_feature", "img_rank", "img_logits", "txt_feature", "txt_rank", "txt_logits"}
    only_txt = small(tokens=tokens)
    assert set(only_txt) == {"txt_feature", "txt_rank", "txt_logits"}
    small.train()


def test_shared_w_gradient_is_the_sum_of_both_losses(small: models.DualPath) -> None:
    small.train()
    images, tokens, labels = batch(seed=1)
    w = small.classifier.weight
    others = [p for p in small.parameters() if p is not w]
    for p in others:  # only W's gradient is under test: keep the backward cheap
        p.requires_grad_(False)
    try:
        out = small(images, tokens)
        l_img = instance_loss(out["img_logits"], labels)
        l_txt = instance_loss(out["txt_logits"], labels)
        g_img, = torch.autograd.grad(l_img, w, retain_graph=True)
        g_txt, = torch.autograd.grad(l_txt, w, retain_graph=True)
        small.zero_grad()
        (l_img + l_txt).backward()
    finally:
        for p in others:
            p.requires_grad_(True)
    assert g_img.abs().sum() > 0 and g_txt.abs().sum() > 0
    assert not torch.allclose(g_img, g_txt)
    assert torch.allclose(w.grad, g_img + g_txt, atol=1e-7, rtol=1e-5)
    small.zero_grad()


# --------------------------------------------------------------------------------------- precision, layout

def test_bf16_autocast_forward_and_loss_are_finite(small: models.DualPath) -> None:
    small.train()
    images, tokens, labels = batch(b=2, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = small(images, tokens)
        j, terms = total_loss(out, labels, labels, lambda_rank=2.0, lambda_img=1.0, lambda_txt=0.1)
    assert torch.isfinite(j) and j.dtype == torch.float32
    assert all(torch.isfinite(v) for v in terms.values())
    small.zero_grad()
    j.backward()
    assert torch.isfinite(small.classifier.weight.grad).all() and small.classifier.weight.grad.abs().sum() > 0
    small.zero_grad()
    small.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = small.image.test_feature(images[:1])
        txt = small.text.test_feature(tokens[:1], torch.tensor([MAX_LEN]))
    assert img.dtype == txt.dtype == torch.float32
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    small.train()


def test_channels_last_model_and_input(small: models.DualPath) -> None:
    small.eval()
    images, tokens, _ = batch(seed=3)
    with torch.no_grad():
        ref = small(images, tokens)["img_feature"]
        cl = small.to(memory_format=torch.channels_last)
        got = cl(images.contiguous(memory_format=torch.channels_last), tokens)["img_feature"]
    assert torch.allclose(got, ref, atol=1e-4)
    small.to(memory_format=torch.contiguous_format).train()


# -------------------------------------------------------------------------------------------- models/spec.py

def test_spec_imports_only_the_standard_library() -> None:
    import ast
    tree = ast.parse((ROOT / "models" / "spec.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "math", "dataclasses"}, imported


def _spec_keys(depth: str, arch: str, text_width: float, backbone_width: float) -> dict[str, tuple[int, ...]]:
    """Every weight the spec names, with the shape its widths give: the caffe backbone, heads, text CNN, W."""
    from models import spec
    keys: dict[str, tuple[int, ...]] = {}
    stem = spec.resnet_stem(backbone_width)
    seq = {name: f"image.backbone.{i}" for i, name in enumerate(spec.BACKBONE_SEQUENCE)}
    keys[f"{seq['conv1']}.weight"], keys[f"{seq['bn1']}.weight"] = (stem, 3, 7, 7), (stem,)
    for b in spec.resnet_blocks(arch, backbone_width):
        layer, k = b.key.split(".")
        pre = f"{seq[layer]}.{k}"
        for (conv, bn), shape in zip(spec.CAFFE_BOTTLENECK, ((b.mid, b.cin, 1, 1), (b.mid, b.mid, 3, 3),
                                                              (b.cout, b.mid, 1, 1))):
            keys[f"{pre}.{conv}.weight"], keys[f"{pre}.{bn}.weight"] = shape, shape[:1]
        if b.projection:
            conv, bn = spec.CAFFE_PROJECTION
            keys[f"{pre}.{conv}.weight"], keys[f"{pre}.{bn}.weight"] = (b.cout, b.cin, 1, 1), (b.cout,)
    for b in spec.text_blocks(depth, text_width):
        for (conv, bn), shape in zip(spec.TEXT_BRANCH, ((b.mid, b.cin, 1), (b.mid, b.mid, 2), (b.cout, b.mid, 1))):
            keys[f"{b.key}.{conv}.weight"], keys[f"{b.key}.{bn}.weight"] = shape, shape[:1]
        if b.projection:
            conv, bn = spec.TEXT_SHORTCUT
            keys[f"{b.key}.{conv}.weight"], keys[f"{b.key}.{bn}.weight"] = (b.cout, b.cin, 1), (b.cout,)
    return keys


@pytest.mark.parametrize("depth, arch", [("res50", "resnet50"), ("res152", "resnet152")])
def test_models_are_built_as_the_spec_says(depth: str, arch: str) -> None:
    """The spec's block counts, widths, strides and state-dict names are those of the modules (the converter writes
    these names, the test fixtures use these sizes); every new BN has the spec's epsilon."""
    from models import spec
    model = build_model(num_classes=3, vocab_size=V, max_len=MAX_LEN, word2vec=None, arch=arch, pretrained="none",
                        text_depth=depth, feature_dim=16, text_width=1 / 16, backbone_style="caffe",
                        backbone_width=1 / 16, pixel_mean=(1.0, 2.0, 3.0))
    state = model.state_dict()
    want = _spec_keys(depth, arch, 1 / 16, 1 / 16)
    for conv, bn in spec.IMAGE_HEAD:
        assert f"{conv}.weight" in state and f"{bn}.running_var" in state
    for key in (f"{spec.TEXT_EMBED}.weight", spec.TEXT_EMBED_BIAS, f"{spec.TEXT_EMBED_BN}.weight",
                *(f"{k}.weight" for k in spec.TEXT_FC), f"{spec.CLASSIFIER}.weight"):
        assert key in state, key
    got = {k: tuple(v.shape) for k, v in state.items() if k.endswith(".weight") and
           k.startswith(("image.backbone.", "text.blocks."))}
    assert got == want
    strides = [b.stride for b in spec.text_blocks(depth, 1 / 16)]
    assert [blk.branch[3].conv.stride[0] for blk in model.text.blocks] == strides
    assert [blk.conv1.stride[0] for layer in model.image.backbone[4:] for blk in layer] == \
        [b.stride for b in spec.resnet_blocks(arch, 1 / 16)]  # the Caffe ResNet's stride sits in the first 1x1
    new_bns = [m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and not name.startswith("image.backbone.")]
    assert new_bns and all(m.eps == spec.NEW_BN_EPS and m.momentum == spec.NEW_BN_MOMENTUM for m in new_bns)


# ------------------------------------------------------------------------------------------ torchvision guard

def test_torchvision_imports_after_models_and_guard_is_idempotent() -> None:
    import torchvision
    import torchvision.models as tvm

    assert callable(tvm.resnet50)
    guard = models.torchvision_guard
    first = guard.install()
    lib = guard._library
    assert guard.install() is first and guard.install() is first
    assert guard._library is lib  # no second Library / no re-definition
    for op in ("nms", "qnms"):
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")  # raises if the schema is missing
    assert torchvision.__version__.startswith("0.28")


def test_torchvision_import_in_fresh_process() -> None:
    code = "import models, torchvision, torchvision.models as m; assert callable(m.resnet50); print('ok')"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


# ------------------------------------------------------------------------------------------- full size (slow)

@pytest.mark.slow
def test_full_resnet50_and_text_cnn_forward_backward() -> None:
    torch.manual_seed(0)
    model = build_model(num_classes=10, vocab_size=100, max_len=32, word2vec=None, arch="resnet50",
                        pretrained="none")
    groups = {g["name"]: g for g in models.param_groups(model, 2)}  # Stage II: everything trainable
    # spec 7.3: ResNet-50 = conv1 + 52 bias-free conv filters + 53 BN layers (213 = 2 + 52 + 53 x 3 in MatConvNet)
    assert len(groups["backbone_conv1"]["params"]) == 1
    assert len(groups["backbone_conv"]["params"]) == 52
    assert len(groups["backbone_bn_w"]["params"]) == len(groups["backbone_bn_b"]["params"]) == 53
    assert "backbone_b" not in groups or not groups["backbone_b"]["params"]
    model.train()
    images = torch.randn(2, 3, 224, 224)
    tokens = torch.randint(1, 101, (2, 32))
    tokens[1, 12:] = 0
    labels = torch.tensor([3, 7])
    out = model(images, tokens)
    j, _ = total_loss(out, labels, labels, lambda_rank=2.0, lambda_img=1.0, lambda_txt=0.1)
    j.backward()
    assert out["img_feature"].shape == out["txt_feature"].shape == (2, 2048)
    assert torch.isfinite(j)
    assert model.image.backbone[0].weight.grad.abs().sum() > 0
    assert model.text.embed.weight.grad.abs().sum() > 0
