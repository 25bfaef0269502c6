"""The dual-path network: image CNN + text CNN + ONE shared classifier W (spec 6.1).

Both paths are classified into the N instance classes by the same ``nn.Linear(2048, N)`` module, so W is one tensor
and its gradient is the sum of the gradients of the image and the text instance losses. Dropping the sharing (two
classifiers) is exactly what the paper warns against: the two feature spaces would drift apart.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from .image_cnn import ImageCNN
from .text_cnn import TextCNN

# A branch: a path module and its arguments; a runner takes branches and returns their outputs, in order.
Branch = tuple[Callable[..., dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]
BranchRunner = Callable[[Sequence[Branch]], list[dict[str, torch.Tensor]]]


def one_after_another(branches: Sequence[Branch]) -> list[dict[str, torch.Tensor]]:
    """The default runner: each path on the current stream, in order (the training engine can run them side by
    side on CUDA streams instead, ``engine/step.py``'s ``BranchStreams``; the results are the same)."""
    return [fn(*args) for fn, args in branches]


class DualPath(nn.Module):
    def __init__(self, image: ImageCNN, text: TextCNN, num_classes: int, classifier_bias: bool = True) -> None:
        super().__init__()
        self.image, self.text = image, text
        dim = text.fc.out_features
        self.classifier = nn.Linear(dim, num_classes, bias=classifier_bias)  # the shared W
        with torch.no_grad():  # spec 7.2: 0.1 x Uniform(+-sqrt(3/2048)), bias 0
            bound = 0.1 * math.sqrt(3.0 / dim)
            self.classifier.weight.uniform_(-bound, bound)
            if classifier_bias:
                self.classifier.bias.zero_()

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                run_branches: BranchRunner = one_after_another) -> dict[str, torch.Tensor]:
        """Training forward. Keys: ``img_feature``/``txt_feature`` (pre-ReLU), ``img_rank``/``txt_rank``
        (post-ReLU, before dropout), ``img_logits``/``txt_logits`` (shared W on the dropout outputs).
        ``run_branches`` runs the two paths (independent until W); W and everything after it run afterwards."""
        branches: list[Branch] = ([(self.image, (images,))] if images is not None else []) + \
            ([(self.text, (tokens,))] if tokens is not None else [])
        paths = iter(run_branches(branches))
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            img = next(paths)  # (B, 2048) each
            out.update(img_feature=img["feature"], img_rank=img["rank"],
                       img_logits=self.classifier(img["logit_input"]))  # (B, N)
        if tokens is not None:
            txt = next(paths)
            out.update(txt_feature=txt["feature"], txt_rank=txt["rank"],
                       txt_logits=self.classifier(txt["logit_input"]))  # (B, N)
        return out


def build_model(*, num_classes: int, vocab_size: int, max_len: int, word2vec: torch.Tensor | None,
                arch: str = "resnet50", pretrained: str = "imagenet", dropout: float = 0.75,
                classifier_bias: bool = True, text_pool: str = "max", text_depth: str = "res50",
                image_pool: int = 7, feature_dim: int = 2048, text_width: float = 1.0,
                backbone_style: str = "torchvision", backbone_bn_eps: float = 1e-5, backbone_width: float = 1.0,
                pixel_mean: tuple[float, float, float] | None = None) -> DualPath:
    """Build the network from plain values (the training config and the prepared manifest provide them).
    ``feature_dim``, ``text_width`` and ``backbone_width`` other than 2048 / 1.0 / 1.0 are small-CPU options, not the
    paper. ``backbone_style``: "torchvision" or "caffe" (``models/image_cnn.py``); ``pixel_mean`` for "caffe"."""
    image = ImageCNN(arch=arch, pretrained=pretrained, dropout=dropout, pool=image_pool, feature_dim=feature_dim,
                     style=backbone_style, bn_eps=backbone_bn_eps, backbone_width=backbone_width,
                     pixel_mean=pixel_mean)
    text = TextCNN(vocab_size, max_len=max_len, word2vec=word2vec, dropout=dropout, pool=text_pool,
                   depth=text_depth, feature_dim=feature_dim, width=text_width)
    return DualPath(image, text, num_classes, classifier_bias)
