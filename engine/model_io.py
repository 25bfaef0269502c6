"""Build the DualPath of a run, and rebuild a trained one from a checkpoint for inference (search, evaluation).

``make_model(cfg, data, init)`` builds the network of a recipe: Stage I with fresh heads and the pretrained backbone,
Stage II (or inference) from a checkpoint's weights, refusing one whose model keys differ from the recipe's.

``load_model(checkpoint, data, device)`` reads the checkpoint with ``weights_only=True`` (``engine.checkpoint.load``),
checks that it was trained on prepared data of the same shape (dictionary size, max_len, number of classes) as
``data``, rebuilds the network exactly as training did (``make_model`` with the checkpoint's own
config: no pretrained weights are read) and returns it on ``device`` in eval mode, with the checkpoint dict.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from models import DualPath, build_model
from models.image_cnn import weights_style
from utils.cli import InvalidValue

from . import checkpoint as ckpt_io
from .config import Config, config_from_dict
from .data import Prepared

CHECKED_KEYS = ("vocab_size", "max_len", "num_classes")
MODEL_KEYS = ("arch", "train_crop", "text_depth", "text_pool", "classifier_bias", "feature_dim", "text_width",
              "backbone_style", "backbone_bn_eps", "backbone_width")  # must match Stage I


def resolve_backbone_style(cfg: Config, init: dict | None) -> str:
    """The concrete backbone style of a run: the config's, or for "auto" the Stage I checkpoint's (Stage II), else
    "caffe" when ``pretrained`` is a file with a caffe sidecar (``python -m matconvnet backbone``), else torchvision.
    Checkpoints written before the styles existed are torchvision."""
    if cfg.backbone_style != "auto":
        return cfg.backbone_style
    if init is not None:
        old = init.get("config", {}).get("backbone_style", "auto")
        return "torchvision" if old == "auto" else old
    return weights_style(cfg.pretrained)


def make_model(cfg: Config, data: Prepared, init: dict | None) -> tuple[DualPath, str]:
    """Stage I: fresh heads + pretrained backbone. Stage II: the Stage I checkpoint's weights.
    Sets ``cfg.backbone_style`` to the resolved style (so that checkpoints record it)."""
    cfg.backbone_style = resolve_backbone_style(cfg, init)
    pixel_mean = None
    if cfg.backbone_style == "caffe" and init is not None:
        pixel_mean = (0.0, 0.0, 0.0)  # a placeholder: the checkpoint's image.pixel_mean replaces it
    elif cfg.backbone_style == "caffe":  # the original subtracts the training images' mean RGB (imdb.rgbMean)
        pixel_mean = data.manifest.get("rgb_mean")
        if pixel_mean is None:
            raise InvalidValue(f"{data.root / 'manifest.json'}: no rgb_mean (the training images' mean RGB, which the "
                             f"caffe-style backbone subtracts); prepare the data again with this version")
    kwargs = dict(num_classes=data.num_classes, vocab_size=data.vocab_size, max_len=data.max_len,
                  arch=cfg.arch, dropout=cfg.dropout, classifier_bias=cfg.classifier_bias,
                  text_pool=cfg.text_pool, text_depth=cfg.text_depth, feature_dim=cfg.feature_dim,
                  text_width=cfg.text_width, backbone_style=cfg.backbone_style,
                  backbone_bn_eps=cfg.backbone_bn_eps, backbone_width=cfg.backbone_width, pixel_mean=pixel_mean,
                  image_pool=math.ceil(cfg.train_crop / 32))  # the layer4 map of a training crop: 7 at 224
    if init is None:
        word2vec = data.word2vec() if cfg.text_init == "word2vec" else None  # None: random (Table 3 ablation)
        model = build_model(word2vec=word2vec, pretrained=cfg.pretrained, **kwargs)
        return model, model.image.pretrained_source
    old = config_from_dict(init["config"]).to_dict()
    old["backbone_style"] = resolve_backbone_style(Config(backbone_style="auto"), init)  # the checkpoint's own
    diff = {k: (old[k], getattr(cfg, k)) for k in MODEL_KEYS if old[k] != getattr(cfg, k)}
    if diff:
        raise InvalidValue(f"Stage II config differs from the Stage I checkpoint in model keys {diff}")
    model = build_model(word2vec=None, pretrained="none", **kwargs)
    weights = dict(init["model"])
    for key in ("image.pixel_mean", "image.pixel_std"):  # checkpoints from before the normalisation buffers
        weights.setdefault(key, getattr(model.image, key.split(".")[1]))
    model.load_state_dict(weights)
    return model, init["pretrained_source"]


class CheckpointMismatch(InvalidValue):
    """The checkpoint does not fit the prepared data (a file that is no training checkpoint at all is
    ``engine.checkpoint.CheckpointError``)."""


def load_model(checkpoint_path: str | Path, data: Prepared | str | Path,
               device: str | torch.device = "cpu") -> tuple[DualPath, dict[str, Any]]:
    path = Path(checkpoint_path)
    data = data if isinstance(data, Prepared) else Prepared(data)
    state = ckpt_io.load_training(path, map_location="cpu")
    trained_on = state.get("data") or {}
    diff = {k: (trained_on[k], data.manifest.get(k)) for k in CHECKED_KEYS
            if trained_on.get(k) is not None and trained_on[k] != data.manifest.get(k)}
    ours, theirs = trained_on.get("dictionary_sha256"), data.manifest.get("dictionary_sha256")
    if ours is not None and theirs is not None and ours != theirs:  # older files without the hash: vocab only
        diff["dictionary_sha256"] = (ours, theirs)
    if diff:
        raise CheckpointMismatch(
            f"{path} was trained on prepared data {trained_on.get('dataset')!r} that differs from {data.root} "
            f"(dataset {data.manifest.get('dataset')!r}) in {', '.join(f'{k} {a} vs {b}' for k, (a, b) in diff.items())} (checkpoint vs prepared)"
            f"; pass the prepared directory the model was trained on (its dictionary defines the word indices)")
    state.setdefault("pretrained_source", "checkpoint")
    try:
        model, _ = make_model(config_from_dict(state["config"]), data, init=state)
    except RuntimeError as e:  # load_state_dict: missing keys or other shapes than its own config builds
        raise CheckpointMismatch(f"{path}: its weights do not fit the network its config describes: {e}") from None
    model.to(torch.device(device)).eval()
    return model, state
