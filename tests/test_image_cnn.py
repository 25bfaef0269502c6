"""Tests for models.image_cnn: the image path, its test-time feature (spec 4.1, 8.1, 10.4) and weight loading."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from tests.test_text_cnn import randomize_bn_
from models import ImageCNN, PretrainedWeightsMissing

import torchvision  # noqa: E402  (after models: the guard)


@pytest.fixture(scope="module")
def img18() -> ImageCNN:
    torch.manual_seed(0)
    model = ImageCNN(arch="resnet18", pretrained="none", pool=4)
    randomize_bn_(model)
    return model.eval()


def bn_eval_by_hand(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:  # x (N, C)
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def head_at_positions_by_hand(model: ImageCNN, images: torch.Tensor, pool: int) -> tuple[torch.Tensor, int, int]:
    """Sum over every pooled position of fc1_1bn(fc1_1(relu(fc1bn(fc1(avg window))))), written out plainly."""
    fmap = model.backbone(images)  # (N, C, H', W')
    h, w = fmap.shape[2] - pool + 1, fmap.shape[3] - pool + 1
    w1 = model.fc1.weight[:, :, 0, 0]
    w2 = model.fc1_1.weight[:, :, 0, 0]
    total = torch.zeros(images.shape[0], w2.shape[0])
    for i in range(h):
        for j in range(w):
            v = fmap[:, :, i:i + pool, j:j + pool].mean(dim=(2, 3))  # AvgPool2d(pool, stride 1) at (i, j)
            v = torch.relu(bn_eval_by_hand(model.fc1_bn, v @ w1.T))
            total += bn_eval_by_hand(model.fc1_1_bn, v @ w2.T)  # pre-ReLU
    return total, h, w


def test_head_structure() -> None:
    model = ImageCNN(arch="resnet18", pretrained="none")
    assert isinstance(model.pool, nn.AvgPool2d) and model.pool.kernel_size == 7 and model.pool.stride == 1
    assert model.fc1.bias is None and model.fc1_1.bias is None
    assert (model.fc1.in_channels, model.fc1.out_channels, model.fc1_1.out_channels) == (512, 2048, 2048)
    assert model.dropout.p == 0.75
    for bn in (model.fc1_bn, model.fc1_1_bn):
        assert bn.eps == 1e-3 and bn.momentum == 0.05


def test_forward_outputs(img18: ImageCNN) -> None:
    x = torch.randn(2, 3, 112, 112)  # resnet18: 4x4 map, pool 4 -> 1x1
    with torch.no_grad():
        out = img18(x)
        ref, h, w = head_at_positions_by_hand(img18, x, 4)
    assert (h, w) == (1, 1)
    assert set(out) == {"feature", "rank", "logit_input"}
    assert torch.allclose(out["feature"], ref, atol=1e-4)
    assert torch.equal(out["rank"], torch.relu(out["feature"]))
    assert torch.equal(out["logit_input"], out["rank"])  # eval: no dropout
    assert (out["feature"] < 0).any()


def test_test_feature_sums_positions_and_flip_on_nonsquare_input(img18: ImageCNN) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 128, 192, generator=g)  # resnet18: 4x6 map, pool 4 -> 1x3 positions
    got = img18.test_feature(x)
    with torch.no_grad():
        plain, h, w = head_at_positions_by_hand(img18, x, 4)
        flipped, _, _ = head_at_positions_by_hand(img18, x.flip(3), 4)
        one_pos = img18.feature_map(x)[:, :, 0, 0]
    assert (h, w) == (1, 3)
    assert got.shape == (2, 2048)
    assert torch.allclose(got, plain + flipped, atol=1e-3, rtol=1e-4)
    assert not torch.allclose(plain, flipped, atol=1e-2)  # the flip contributes something else
    assert not torch.allclose(plain, 3 * one_pos, atol=1e-2)  # positions really differ
    assert img18.feature_map(x).shape == (2, 2048, 1, 3)


def test_test_feature_on_1x1_map_is_forward_plus_flipped(img18: ImageCNN) -> None:
    x = torch.randn(3, 3, 112, 112)
    got = img18.test_feature(x)
    with torch.no_grad():
        ref = img18(x)["feature"] + img18(x.flip(3))["feature"]
    assert torch.allclose(got, ref, atol=1e-4)


def test_channels_last_input_gives_same_output(img18: ImageCNN) -> None:
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = img18(x)["feature"]
        got = img18(x.contiguous(memory_format=torch.channels_last))["feature"]
    assert torch.allclose(got, ref, atol=1e-4)


# ------------------------------------------------------------------------------------------ pretrained weights

def _random_resnet18_state(path) -> dict:
    torch.manual_seed(5)
    net = torchvision.models.resnet18(weights=None)
    state = net.state_dict()
    with torch.no_grad():  # non-default running stats, so that loading them is visible too
        for k, v in state.items():
            if k.endswith("running_mean"):
                v.copy_(torch.randn_like(v))
            elif k.endswith("running_var"):
                v.copy_(torch.rand_like(v) + 0.5)
    torch.save(state, path)
    return state


def _assert_backbone_equals(model: ImageCNN, state: dict) -> None:
    prefix = {"conv1.": "0.", "bn1.": "1.", "layer1.": "4.", "layer2.": "5.", "layer3.": "6.", "layer4.": "7."}
    got = model.backbone.state_dict()
    n = 0
    for k, v in state.items():
        if k.startswith("fc."):
            continue  # the ImageNet classifier is dropped
        head = next(p for p in prefix if k.startswith(p))
        assert torch.equal(got[prefix[head] + k[len(head):]], v), k
        n += 1
    assert n == len(got)


def test_imagenet_missing_weights_names_exact_path(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert models.imagenet_weights_path("resnet18") == expected
    with pytest.raises(PretrainedWeightsMissing) as err:
        ImageCNN(arch="resnet18", pretrained="imagenet")
    assert str(expected) in str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    # once torchvision's file is there, it is used (and nothing is downloaded)
    expected.parent.mkdir(parents=True)
    state = _random_resnet18_state(expected)
    model = ImageCNN(arch="resnet18", pretrained="imagenet")
    _assert_backbone_equals(model, state)
    assert str(expected) in model.pretrained_source


def test_imagenet_path_follows_hub_set_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # restored after the test
    torch.hub.set_dir(str(tmp_path / "h"))
    with pytest.raises(PretrainedWeightsMissing) as err:
        ImageCNN(arch="resnet50", pretrained="imagenet")
    assert str(tmp_path / "h" / "checkpoints" / "resnet50-0676ba61.pth") in str(err.value)


def test_pretrained_path_loads_state_dict(tmp_path) -> None:
    path = tmp_path / "r18.pth"
    state = _random_resnet18_state(path)
    model = ImageCNN(arch="resnet18", pretrained=str(path))
    _assert_backbone_equals(model, state)
    assert str(path) in model.pretrained_source
    with pytest.raises(PretrainedWeightsMissing):
        ImageCNN(arch="resnet18", pretrained=str(tmp_path / "missing.pth"))


def test_pretrained_path_with_another_class_count_loads_backbone(tmp_path) -> None:
    """A backbone pretrained on other classes (e.g. 65 attribute labels) fits: its classifier is never used."""
    torch.manual_seed(6)
    net = torchvision.models.resnet18(weights=None, num_classes=65)
    path = tmp_path / "r18_65.pth"
    torch.save(net.state_dict(), path)
    model = ImageCNN(arch="resnet18", pretrained=str(path))
    _assert_backbone_equals(model, net.state_dict())


def test_pretrained_path_of_another_arch_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(RuntimeError, match="size mismatch"):  # same keys, other shapes: PyTorch names each tensor
        ImageCNN(arch="resnet18", pretrained=str(path))
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer4.1.bn2.running_var"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        ImageCNN(arch="resnet18", pretrained=str(path))
    assert str(path) in str(err.value) and "layer4.1.bn2.running_var" in str(err.value)
    assert "extra.weight" in str(err.value)


def test_pretrained_none_and_unknown_arch() -> None:
    model = ImageCNN(arch="resnet18", pretrained="none")
    assert model.pretrained_source.startswith("none")
    with pytest.raises(ValueError) as err:
        ImageCNN(arch="resnet34", pretrained="none")
    for name in ("resnet18", "resnet50", "resnet152", "vgg19"):
        assert name in str(err.value)
