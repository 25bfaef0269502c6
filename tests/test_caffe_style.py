"""The caffe-style backbone (models/caffe_resnet.py, decision 17) and the input normalisation that travels with the
model: MatConvNet's pool1 windows, the stride in the first 1x1 conv, the conv1 bias, the BN epsilon, 0-255 minus the
training images' mean RGB (manifest rgb_mean), the style resolution and the refusal to mix the two styles."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import models  # noqa: F401  (torchvision guard first)
from engine import checkpoint as ckpt
from engine.config import Config
from engine.data import Prepared
from engine.loop import Trainer
from engine.model_io import make_model
from engine.model_io import load_model
from models.caffe_resnet import CaffeResNet
from models.image_cnn import IMAGENET_MEAN, IMAGENET_STD, ImageCNN, sidecar_path

WIDTH = 0.125  # a ResNet-50 with stage widths 8..64 (x4): the real block counts, tiny tensors


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize_(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (the defaults 0/1 would hide eps and mean mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.out_channels, generator=g))
    return net


def write_caffe_backbone(path: Path, eps: float = 1e-5, sidecar: dict | None = None) -> dict:
    """A caffe-style backbone file as ``python -m matconvnet backbone`` writes it (state dict + sidecar)."""
    torch.manual_seed(1)
    state = randomize_(CaffeResNet("resnet50", eps, WIDTH)).state_dict()
    torch.save(state, path)
    meta = {"format": "dualpath-backbone", "style": "caffe", "arch": "resnet50", "bn_eps": eps,
            "backbone_width": WIDTH, "pixel_mean": [120.0, 115.0, 100.0]}
    sidecar_path(path).write_text(json.dumps(sidecar if sidecar is not None else meta))
    return state


# --------------------------------------------------------------------------------------------- structure
def maxpool_matconvnet(x: np.ndarray, pad: tuple[int, int, int, int], size: int = 3, stride: int = 2) -> np.ndarray:
    """MatConvNet max pooling by hand: pad [top bottom left right] with -inf, windows floor((H+Pt+Pb-size)/S)+1."""
    t, b, l, r = pad
    xp = np.pad(x, ((t, b), (l, r)), constant_values=-np.inf)
    oh, ow = (xp.shape[0] - size) // stride + 1, (xp.shape[1] - size) // stride + 1
    return np.array([[xp[i * stride:i * stride + size, j * stride:j * stride + size].max() for j in range(ow)]
                     for i in range(oh)])


@pytest.mark.parametrize("h,w", [(7, 7), (8, 9), (112, 112), (128, 171), (15, 22)])
def test_pool1_is_matconvnets_padded_pool(h, w):
    """The importer writes pool1 as pad [0 1 0 1] with padded cells ignored; ceil_mode without padding gives the
    same windows for every size (torchvision's padding=1 would shift them)."""
    x = torch.randn(1, 1, h, w)
    ours = CaffeResNet("resnet50", width=WIDTH).maxpool(x)[0, 0].numpy()
    assert np.array_equal(ours, maxpool_matconvnet(x[0, 0].numpy(), (0, 1, 0, 1)))
    torchvision_pool = nn.MaxPool2d(3, 2, 1)(x)[0, 0].numpy()
    assert ours.shape != torchvision_pool.shape or not np.array_equal(ours, torchvision_pool)


def test_caffe_resnet_structure():
    net = CaffeResNet("resnet50", eps=2e-5, width=WIDTH)
    assert net.conv1.bias is not None and net.conv1.stride == (2, 2) and net.conv1.padding == (3, 3)
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert [len(getattr(CaffeResNet("resnet152", width=WIDTH), f"layer{i}")) for i in range(1, 5)] == [3, 8, 36, 3]
    for i in range(1, 5):
        first = getattr(net, f"layer{i}")[0]
        s = 1 if i == 1 else 2
        assert first.conv1.stride == (s, s) and first.conv2.stride == (1, 1) and first.conv2.padding == (1, 1)
        assert first.downsample[0].stride == (s, s)
    assert all(m.eps == 2e-5 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d) and m is not net.conv1)
    full = CaffeResNet("resnet50")
    assert full.out_channels == 2048
    # the same parameter names and shapes as torchvision's resnet50, plus conv1.bias
    import torchvision
    tv = {k: v.shape for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    ours = {k: v.shape for k, v in full.state_dict().items()}
    assert set(ours) - set(tv) == {"conv1.bias"} and set(tv) <= set(ours)
    assert all(ours[k] == tv[k] for k in tv)


def test_bottleneck_stride_in_the_first_1x1_by_hand():
    net = randomize_(CaffeResNet("resnet50", width=WIDTH)).eval()
    block = net.layer2[0]
    x = torch.randn(2, block.conv1.in_channels, 9, 11)

    def bn(m, v):
        return (v - m.running_mean[:, None, None]) / torch.sqrt(m.running_var + m.eps)[:, None, None] \
            * m.weight[:, None, None] + m.bias[:, None, None]

    with torch.no_grad():
        y = F.relu(bn(block.bn1, F.conv2d(x, block.conv1.weight, stride=2)))  # the 1x1 carries the stride
        y = F.relu(bn(block.bn2, F.conv2d(y, block.conv2.weight, padding=1)))
        y = bn(block.bn3, F.conv2d(y, block.conv3.weight))
        short = bn(block.downsample[1], F.conv2d(x, block.downsample[0].weight, stride=2))
        assert torch.allclose(block(x), F.relu(y + short), atol=1e-5)


@pytest.mark.parametrize("size,expect", [((224, 224), (1, 1)), ((256, 341), (2, 5))])
def test_pool5_map_sizes(size, expect):
    """Reference section 7: a 256x341 test image gives a 2x5 pool5 map (10 positions summed per flip)."""
    model = ImageCNN("resnet50", "none", style="caffe", backbone_width=WIDTH, pixel_mean=(1.0, 2.0, 3.0)).eval()
    with torch.no_grad():
        fmap = model.feature_map(torch.zeros(1, 3, *size))
    assert tuple(fmap.shape[2:]) == expect


# --------------------------------------------------------------------------------------------- normalisation
def test_normalize_per_style():
    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    tv = ImageCNN("resnet18", "none")
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(tv.normalize(x), (x.float() / 255 - mean) / std, atol=1e-5)  # torchvision's convention
    caffe = ImageCNN("resnet50", "none", style="caffe", backbone_width=WIDTH, pixel_mean=(120.5, 115.25, 100.0))
    expect = x.float() - torch.tensor([120.5, 115.25, 100.0]).view(1, 3, 1, 1)  # 0-255 minus the mean, no std
    assert torch.equal(caffe.normalize(x), expect)
    assert caffe.normalize(x, channels_last=True).is_contiguous(memory_format=torch.channels_last)
    assert {"image.pixel_mean", "image.pixel_std"} <= set(models.build_model(
        num_classes=3, vocab_size=5, max_len=8, word2vec=None, arch="resnet18", pretrained="none", feature_dim=16,
        text_width=0.0625).state_dict())
    with pytest.raises(ValueError, match="needs pixel_mean"):
        ImageCNN("resnet50", "none", style="caffe", backbone_width=WIDTH)
    with pytest.raises(ValueError, match="ImageNet's mean/std"):
        ImageCNN("resnet18", "none", pixel_mean=(1.0, 2.0, 3.0))


# --------------------------------------------------------------------------------------------- loading, mixing
def test_caffe_file_loads_exactly_and_styles_never_mix(tmp_path):
    path = tmp_path / "r50.pth"
    state = write_caffe_backbone(path, eps=1e-5)
    model = ImageCNN("resnet50", str(path), style="caffe", backbone_width=WIDTH, pixel_mean=(1.0, 2.0, 3.0))
    got = model.backbone.state_dict()
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    for k, v in state.items():
        head, rest = k.split(".", 1)
        assert torch.equal(got[f"{names.index(head)}.{rest}"], v), k
    with pytest.raises(ValueError, match="caffe-style weights .* backbone style is torchvision"):
        ImageCNN("resnet50", str(path), style="torchvision")
    bare = tmp_path / "bare.pth"  # the same tensors without the caffe sidecar: torchvision-style by definition
    torch.save(state, bare)
    with pytest.raises(ValueError, match="torchvision-style weights .* backbone style is caffe"):
        ImageCNN("resnet50", str(bare), style="caffe", backbone_width=WIDTH, pixel_mean=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="python -m matconvnet backbone"):
        ImageCNN("resnet50", "imagenet", style="caffe", pixel_mean=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match=r"records bn_eps 1e-05 but this run has bn_eps 0\.001"):
        ImageCNN("resnet50", str(path), style="caffe", bn_eps=1e-3, backbone_width=WIDTH, pixel_mean=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match=r"records backbone_width 0\.125 .* backbone_width 0\.25"):
        ImageCNN("resnet50", str(path), style="caffe", backbone_width=0.25, pixel_mean=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match=r"records arch 'resnet50' but this run has arch 'resnet152'"):
        ImageCNN("resnet152", str(path), style="caffe", backbone_width=WIDTH, pixel_mean=(1.0, 2.0, 3.0))
    bad = tmp_path / "bad.pth"
    write_caffe_backbone(bad, sidecar={"style": "matlab"})
    with pytest.raises(ValueError, match=r"bad\.pth\.json: style 'matlab'"):
        ImageCNN("resnet50", str(bad), style="caffe", backbone_width=WIDTH, pixel_mean=(1.0, 2.0, 3.0))


# --------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from prepare.flickr30k import main as prepare_flickr30k
    from prepare.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("caffe_data")
    raw = make_synthetic(root / "raw", images=24, val=4, test=4, seed=3)
    out = root / "prepared"
    assert prepare_flickr30k(["--images", raw["images_dir"], "--captions", raw["captions"], "--split-json",
                              raw["split_json"], "--word2vec", raw["word2vec"], "--out", str(out),
                              "--image-size", "40", "--workers", "1"]) == 0
    return out


def test_manifest_rgb_mean_is_the_training_images_mean(prepared):
    data = Prepared(prepared)
    means = []
    for row in data.split_images("train"):
        with Image.open(data.image_path(int(row))) as im:
            means.append(np.asarray(im.convert("RGB"), np.float64).reshape(-1, 3).mean(0))
    # computed before the JPEG encoding of the prepared files: equal up to JPEG rounding
    assert np.allclose(data.manifest["rgb_mean"], np.mean(means, 0), atol=0.5)
    assert not np.allclose(data.manifest["rgb_mean"], np.mean(means[:4], 0), atol=0.5)  # all of train, not a few


def test_stage1_and_stage2_from_a_caffe_backbone(prepared, tmp_path):
    path = tmp_path / "r50.pth"
    state = write_caffe_backbone(path, eps=1e-5)
    common = dict(dataset="synthetic", arch="resnet50", pretrained=str(path), backbone_width=WIDTH, train_crop=32,
                  feature_dim=32, text_width=0.0625, batch_size=8, workers=0, eval_batch_size=8, num_candidates=8,
                  lr_schedule=[[1, 1.0]], log_every=1, dropout=0.0, seed=0)
    assert Config(**common).backbone_style == "auto"
    run1 = tmp_path / "s1"
    trainer = Trainer(Config(**common), prepared, run1)
    assert trainer.module.image.style == "caffe" and trainer.cfg.backbone_style == "caffe"
    trainer.fit()
    saved = ckpt.load(run1 / ckpt.LAST)
    assert saved["config"]["backbone_style"] == "caffe"
    rgb = Prepared(prepared).manifest["rgb_mean"]
    assert torch.allclose(saved["model"]["image.pixel_mean"], torch.tensor(rgb, dtype=torch.float32))
    assert torch.equal(saved["model"]["image.pixel_std"], torch.ones(3))
    assert torch.equal(saved["model"]["image.backbone.0.bias"], state["conv1.bias"])  # frozen in Stage I
    # Stage II with backbone_style auto takes the Stage I checkpoint's style; the trained mean travels along
    run2 = tmp_path / "s2"
    t2 = Trainer(Config(**{**common, "stage": 2, "lambda_rank": 2.0, "lambda_txt": 0.1, "pretrained": "imagenet"}),
                 prepared, run2, init=run1 / ckpt.LAST)
    assert t2.module.image.style == "caffe"
    assert torch.equal(t2.module.image.pixel_mean, saved["model"]["image.pixel_mean"])
    with pytest.raises(ValueError, match="backbone_style"):  # an explicit torchvision Stage II is refused
        Trainer(Config(**{**common, "stage": 2, "lambda_rank": 2.0, "backbone_style": "torchvision"}), prepared,
                tmp_path / "s2b", init=run1 / ckpt.LAST)
    model, _ = load_model(run1 / ckpt.LAST, prepared)
    assert model.image.style == "caffe" and torch.equal(model.image.pixel_mean, t2.module.image.pixel_mean)


def test_caffe_style_needs_the_manifest_mean(prepared, tmp_path):
    path = tmp_path / "r50.pth"
    write_caffe_backbone(path)
    data = Prepared(prepared)
    data.manifest = {k: v for k, v in data.manifest.items() if k != "rgb_mean"}
    cfg = Config(arch="resnet50", pretrained=str(path), backbone_width=WIDTH, feature_dim=32, text_width=0.0625)
    with pytest.raises(ValueError, match="no rgb_mean"):
        make_model(cfg, data, None)


def test_checkpoint_from_before_the_normalisation_buffers_loads(prepared, tmp_path):
    """Checkpoints written before the styles existed have no image.pixel_mean/pixel_std and no backbone_style: they
    are torchvision-style and must still load (evaluate.py, search, Stage II --init)."""
    cfg = Config(arch="resnet18", pretrained="none", train_crop=32, feature_dim=32, text_width=0.0625)
    data = Prepared(prepared)
    model, _ = make_model(cfg, data, None)
    old_cfg = {k: v for k, v in cfg.to_dict().items() if k not in ("backbone_style", "backbone_bn_eps",
                                                                     "backbone_width")}
    old = {"model": {k: v for k, v in model.state_dict().items() if "pixel_" not in k}, "config": old_cfg,
           "pretrained_source": "none"}
    rebuilt, _ = make_model(Config(**{**old_cfg, "stage": 2}), data, old)
    assert rebuilt.image.style == "torchvision"
    assert torch.allclose(rebuilt.image.pixel_mean, torch.tensor(IMAGENET_MEAN) * 255)
    assert math.isclose(float(rebuilt.image.pixel_std[0]), IMAGENET_STD[0] * 255, rel_tol=1e-6)
