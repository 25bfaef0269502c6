"""Tests for models.dual_path (the shared W, spec 6.1), mixed precision, the torchvision guard, and one full-size
forward/backward (slow)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
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
def test_full_resnet50_and_text_cnn_forward_backward_under_30s() -> None:
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
    start = time.perf_counter()
    out = model(images, tokens)
    j, _ = total_loss(out, labels, labels, lambda_rank=2.0, lambda_img=1.0, lambda_txt=0.1)
    j.backward()
    elapsed = time.perf_counter() - start
    assert out["img_feature"].shape == out["txt_feature"].shape == (2, 2048)
    assert torch.isfinite(j)
    assert model.image.backbone[0].weight.grad.abs().sum() > 0
    assert model.text.embed.weight.grad.abs().sum() > 0
    assert elapsed < 30, f"forward+backward took {elapsed:.1f} s"
