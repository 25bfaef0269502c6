"""The image path of the dual-path network (spec section 4): a torchvision backbone plus the code's extra head.

    backbone (ResNet-50 up to layer4)      (N, 2048, h, w)
    AvgPool2d(pool, stride=1)              (N, 2048, h-pool+1, w-pool+1)   pool 7 for 224-px training crops
    fc1   1x1 conv 2048->2048, no bias -> BN -> ReLU
    fc1_1 1x1 conv 2048->2048, no bias -> BN     = the test-time image feature (pre-ReLU), summed over positions
    ReLU                                         = the ranking feature (L2-normalised in the loss)
    Dropout                                      -> the shared classifier W (dual_path.py)

For training crops the map after pooling is 1x1. At test time (spec 8.1) the whole prepared image (shorter side
256) goes through the same layers fully convolutionally; the pre-ReLU head output is summed over positions, and the
same is done for the horizontally flipped image and added. VGG-16/19 (spec 4.2, decision 15) use fc6/fc7 as
convolutions and feed the pre-ReLU fc7 (4096-d) to a 4096->4096->2048 head.

Pretrained weights are never downloaded: ``pretrained="imagenet"`` reads torchvision's own file from the torch hub
cache, ``pretrained=PATH`` reads a torchvision state dict, ``pretrained="none"`` is an explicit random init. The
state dict's own classifier (``fc`` / ``classifier.6``) is never used, so a backbone pretrained on any number of
classes fits; any other missing, unexpected or mis-shaped tensor is an error naming the file.

Two backbone styles (decision 17), never mixed silently:

* ``style="torchvision"``: torchvision's ResNet/VGG with its ImageNet weights; input [0, 1] RGB with ImageNet
  mean/std.
* ``style="caffe"``: the original's MatConvNet backbone (``models/caffe_resnet.py``; VGG keeps torchvision's
  structure), loaded from a file written by ``python -m matconvnet backbone``, whose sidecar ``FILE.json``
  says ``"style": "caffe"``; input 0-255 RGB minus a mean, no std. The mean is the RGB mean of the training images
  (the prepared manifest's ``rgb_mean``, as the original used ``imdb.rgbMean``) or, for a converted trained network,
  its stored ``averageImage``.

The normalisation lives in the model (buffers ``pixel_mean`` / ``pixel_std`` in the 0-255 scale, part of the state
dict), so a checkpoint always carries the input convention it was trained with: ``ImageCNN.normalize(uint8)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import torchvision_guard  # noqa: F401  (before torchvision)
import torchvision.models as tvm  # noqa: E402

from utils.cli import InvalidValue  # noqa: E402

from . import spec  # noqa: E402
from .caffe_resnet import CaffeResNet  # noqa: E402
from .text_cnn import init_new_conv_, new_bn  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # decision 17: torchvision weights expect mean/std on [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
UNUSED_HEAD = ("fc.", "classifier.6.")  # the ImageNet classifier: never used here, so any class count is accepted
ARCHS = {  # name -> (constructor, ImageNet weights enum, backbone output channels)
    "resnet18": (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, 2048),
    "resnet152": (tvm.resnet152, tvm.ResNet152_Weights.IMAGENET1K_V1, 2048),
    "vgg16": (tvm.vgg16, tvm.VGG16_Weights.IMAGENET1K_V1, 4096),  # CUHK-PEDES (Table 5)
    "vgg19": (tvm.vgg19, tvm.VGG19_Weights.IMAGENET1K_V1, 4096),
}


STYLES = ("torchvision", "caffe")
CAFFE_STD = (1.0, 1.0, 1.0)  # the MatConvNet/Caffe convention: 0-255 minus the mean, no division


def normalize_pixels(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False
                     ) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (x - mean) / std per channel; mean, std (3,) in the 0-255 scale."""
    x = (images.float() - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class PretrainedWeightsMissing(FileNotFoundError):
    pass


def imagenet_weights_path(arch: str) -> Path:
    """Where torchvision keeps (and where we look for) the ImageNet weights file of ``arch``."""
    url = ARCHS[arch][1].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def sidecar_path(path: str | Path) -> Path:
    """``FILE.json`` beside a weights file ``FILE`` (e.g. ``r50.pth.json``): its provenance and style."""
    return Path(str(path) + ".json")


def read_sidecar(pretrained: str) -> dict:
    """The sidecar ``FILE.json`` of a ``--pretrained`` file as a dict ({} when there is none). A sidecar that is not
    a JSON object, or names an unknown style, is an error naming it."""
    if pretrained in ("none", "imagenet") or not sidecar_path(pretrained).is_file():
        return {}
    side = sidecar_path(pretrained)
    try:
        meta = json.loads(side.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidValue(f"{side}: not a JSON sidecar ({e})") from None
    if not isinstance(meta, dict):
        raise InvalidValue(f"{side}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("style", "torchvision") not in STYLES:
        raise InvalidValue(f"{side}: style {meta['style']!r}; expected one of {list(STYLES)}")
    return meta


def weights_style(pretrained: str) -> str:
    """The backbone style a ``--pretrained`` value needs: "caffe" for a file whose sidecar says so (written by
    ``python -m matconvnet backbone``), else "torchvision" (torchvision's own weights, or a state dict
    without a caffe sidecar)."""
    return read_sidecar(pretrained).get("style", "torchvision")


def load_pretrained_state(arch: str, pretrained: str, style: str = "torchvision", bn_eps: float = 1e-5,
                          backbone_width: float = 1.0) -> tuple[dict | None, str]:
    """Resolve ``pretrained`` to (state dict or None, description recorded in checkpoints and results).
    A file of the other backbone style than ``style`` is refused (weights of one style in the other's structure
    would load without a shape error and compute something else), and so is a caffe file whose sidecar records
    another architecture, BN epsilon or width than the run's (the same silent kind of difference)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown image backbone {arch!r}; choose one of {sorted(ARCHS)}")
    if style not in STYLES:
        raise ValueError(f"unknown backbone style {style!r}; choose one of {list(STYLES)}")
    if pretrained == "none":
        return None, "none (random initialisation, requested explicitly)"
    if pretrained == "imagenet":
        if style == "caffe":
            raise InvalidValue("backbone_style caffe needs the original MatConvNet weights: convert "
                             "imagenet-resnet-50-dag.mat with `python -m matconvnet backbone FILE.mat --out "
                             "FILE.pth` and pass --pretrained FILE.pth ('imagenet' means torchvision's weights)")
        path = imagenet_weights_path(arch)
        if not path.is_file():
            raise PretrainedWeightsMissing(
                f"ImageNet weights for {arch} not found at {path}. This project never downloads. Place torchvision's "
                f"file there (from {ARCHS[arch][1].url}), or pass --pretrained /path/to/state_dict.pth, or "
                f"--pretrained none for an explicit random initialisation.")
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise PretrainedWeightsMissing(f"--pretrained {pretrained}: no such file (expected a torchvision "
                                           f"{arch} state dict, or 'imagenet' or 'none')")
        meta = read_sidecar(pretrained)
        found = meta.get("style", "torchvision")
        if found != style:
            raise InvalidValue(f"--pretrained {path} holds {found}-style weights (sidecar {sidecar_path(path)}"
                             f"{'' if found == 'caffe' else ' absent or without style caffe'}) but the backbone style "
                             f"is {style}: set backbone_style {found} (or auto); the two are never mixed")
        mismatch = {key: (meta[key], ours) for key, ours in (("arch", arch), ("bn_eps", bn_eps),
                                                              ("backbone_width", backbone_width))
                    if found == "caffe" and key in meta and meta[key] != ours}
        if mismatch:
            raise InvalidValue(f"--pretrained {path}: its sidecar {sidecar_path(path)} records "
                             + ", ".join(f"{k} {a!r}" for k, (a, _) in mismatch.items()) + " but this run has "
                             + ", ".join(f"{k} {b!r}" for k, (_, b) in mismatch.items())
                             + " (set arch / backbone_bn_eps / backbone_width to the file's values)")
    what = f"a torchvision {arch} state dict, e.g. written by python -m prepare.synthetic_backbone"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - not a torch file, or one holding more than tensors
        raise InvalidValue(f"--pretrained {path}: not a readable state dict ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); expected {what}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if isinstance(state, dict) and {"model", "config"} <= set(state):
        raise InvalidValue(f"--pretrained {path} is a training checkpoint, not a backbone state dict: pass it to "
                           f"train_stage2.py --init (or evaluate.py --checkpoint); --pretrained expects {what}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidValue(f"--pretrained {path} holds a {type(state).__name__}, not a state dict of tensors; "
                           f"expected {what}")
    return state, f"{pretrained} ({path})"


class VGGBackbone(nn.Module):
    """VGG features + fc6 (as a 7x7 conv) + ReLU + fc7 (as a 1x1 conv), output pre-ReLU fc7 (spec 4.2)."""

    def __init__(self, vgg: nn.Module) -> None:
        super().__init__()
        self.features = vgg.features
        fc6, fc7 = vgg.classifier[0], vgg.classifier[3]
        self.fc6 = nn.Conv2d(512, 4096, 7)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        with torch.no_grad():
            self.fc6.weight.copy_(fc6.weight.view(4096, 512, 7, 7))
            self.fc6.bias.copy_(fc6.bias)
            self.fc7.weight.copy_(fc7.weight.view(4096, 4096, 1, 1))
            self.fc7.bias.copy_(fc7.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, 4096, H/32-6, W/32-6)
        return self.fc7(F.relu(self.fc6(self.features(x))))


class ImageCNN(nn.Module):
    """The image path. ``forward(images)`` on training crops; ``test_feature(images)`` on whole images."""

    def __init__(self, arch: str = "resnet50", pretrained: str = "imagenet", dropout: float = 0.75,
                 pool: int = 7, feature_dim: int = 2048, style: str = "torchvision", bn_eps: float = 1e-5,
                 backbone_width: float = 1.0, pixel_mean: tuple[float, float, float] | None = None) -> None:
        """``style``/``bn_eps``/``backbone_width``: see the module docstring and ``models/caffe_resnet.py``.
        ``pixel_mean``: the caffe style's RGB mean (0-255), required there (a checkpoint's state dict then
        replaces it); the torchvision style always uses ImageNet's mean/std and refuses another."""
        super().__init__()
        state, self.pretrained_source = load_pretrained_state(arch, pretrained, style, bn_eps, backbone_width)
        ctor, _, channels = ARCHS[arch]
        caffe_resnet = style == "caffe" and not arch.startswith("vgg")
        if backbone_width != 1.0 and not caffe_resnet:
            raise InvalidValue(f"backbone_width {backbone_width} exists only for the caffe-style ResNet (test files)")
        net = CaffeResNet(arch, bn_eps, backbone_width) if caffe_resnet else ctor(weights=None)
        if caffe_resnet:
            channels = net.out_channels
        for bn in net.modules():  # the backbone's BN epsilon (MatConvNet stores it per layer: block.epsilon)
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.eps = bn_eps
        if state is not None:
            state = {k: v for k, v in state.items() if not k.startswith(UNUSED_HEAD)}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith(UNUSED_HEAD)]
            if missing or unexpected:
                raise InvalidValue(f"pretrained weights {self.pretrained_source} do not fit the {style}-style {arch}: "
                                 f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.arch, self.style = arch, style
        if style == "torchvision":
            if pixel_mean is not None:
                raise ValueError("the torchvision style uses ImageNet's mean/std; pixel_mean is for the caffe style")
            mean, std = tuple(255 * m for m in IMAGENET_MEAN), tuple(255 * s for s in IMAGENET_STD)
        else:
            if pixel_mean is None or len(pixel_mean) != 3:
                raise ValueError(f"the caffe style needs pixel_mean, the RGB mean (0-255) of the training images; "
                                 f"got {pixel_mean!r}")
            mean, std = tuple(float(m) for m in pixel_mean), CAFFE_STD
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32))  # (3,) 0-255 RGB
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32))  # (3,)
        if arch.startswith("vgg"):
            self.backbone: nn.Module = VGGBackbone(net)
            self.pool: nn.Module = nn.Identity()  # fc6 already covers a 7x7 window
            hidden = channels  # 4096 -> 4096 -> 2048
        else:
            self.backbone = nn.Sequential(*[getattr(net, name) for name in spec.BACKBONE_SEQUENCE])
            self.pool = nn.AvgPool2d(pool, stride=1)  # pool5 of the MatConvNet model
            hidden = feature_dim
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.fc1_bn = new_bn(hidden, dims=2)
        self.fc1_1 = nn.Conv2d(hidden, feature_dim, 1, bias=False)
        self.fc1_1_bn = new_bn(feature_dim, dims=2)
        for conv in (self.fc1, self.fc1_1):
            init_new_conv_(conv.weight)
        self.dropout = nn.Dropout(dropout)

    def normalize(self, images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """uint8 RGB (N, 3, H, W) on any device -> float input of the backbone: (x - pixel_mean) / pixel_std in the
        0-255 scale (torchvision: ImageNet mean/std; caffe: minus the RGB mean, no std)."""
        return normalize_pixels(images, self.pixel_mean, self.pixel_std, channels_last)

    def backbone_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 2048, h, w) pre-ReLU head output at every pooled position."""
        if self.backbone_frozen():  # Stage I: no graph through the frozen backbone (BN still uses batch stats)
            with torch.no_grad():
                x = self.backbone(images)
        else:
            x = self.backbone(images)  # (N, C, H/32, W/32)
        if isinstance(self.pool, nn.AvgPool2d) and min(x.shape[-2:]) < self.pool.kernel_size:
            raise InvalidValue(f"an image of {tuple(images.shape[-2:])} px gives a {tuple(x.shape[-2:])} feature map, "
                             f"smaller than the {self.pool.kernel_size}x{self.pool.kernel_size} pool of a training "
                             f"crop: test images must be at least the training crop (prepare with --image-size >= "
                             f"train_crop)")
        x = self.pool(x)  # (N, C, h, w)
        x = F.relu(self.fc1_bn(self.fc1(x)))  # (N, hidden, h, w)
        return self.fc1_1_bn(self.fc1_1(x))  # (N, 2048, h, w)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training crops (224 px for pool 7: a 1x1 map). Returns ``feature``, ``rank``, ``logit_input``."""
        feature = self.feature_map(images).sum(dim=(2, 3))  # (N, 2048); a sum over the single position
        rank = F.relu(feature)
        return {"feature": feature, "rank": rank, "logit_input": self.dropout(rank)}

    @torch.no_grad()
    def test_feature(self, images: torch.Tensor) -> torch.Tensor:
        """Spec 8.1: whole images (same size within the batch), pre-ReLU head output summed over positions, plus
        the same for the horizontally flipped images. (N, 3, H, W) -> (N, 2048)."""
        both = torch.cat([images, images.flip(3)])  # (2N, 3, H, W)
        summed = self.feature_map(both).float().sum(dim=(2, 3))  # (2N, 2048)
        n = images.shape[0]
        return summed[:n] + summed[n:]
