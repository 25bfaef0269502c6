"""The dual-path network (image CNN + text CNN + one shared classifier W), its losses and parameter groups.

``models.spec`` holds the architecture as plain data (block counts, widths, BatchNorm epsilons, state-dict names per
architecture); the modules are built from it, and the MatConvNet converter and the test fixtures read it too. This
package reads no files except pretrained weights (``--pretrained``) and imports no other package of the project but
``utils``.

Public API::

    build_model(num_classes=, vocab_size=, max_len=, word2vec=, arch=, pretrained=, ...) -> DualPath
    DualPath.forward(images, tokens, run_branches=one_after_another) -> dict of features and shared-W logits
    ImageCNN.test_feature(images), TextCNN.test_feature(tokens, lengths)   # spec 8.1 test-time features
    instance_loss, ranking_loss, hardest_negatives, total_loss             # spec 6.1-6.3, 7.5
    param_groups(model, stage), set_stage(model, stage)                    # spec 7.2-7.3
"""
from . import torchvision_guard  # noqa: F401  (must run before torchvision is imported anywhere)
from .dual_path import BranchRunner, DualPath, build_model, one_after_another
from .image_cnn import ARCHS, ImageCNN, PretrainedWeightsMissing, imagenet_weights_path
from .losses import (RANKING_LOSSES, hardest_negatives, in_batch_ranking_loss, instance_loss, l2_normalize,
                     ranking_loss, top1_accuracy, total_loss)
from .param_groups import param_groups, set_stage
from .text_cnn import TextCNN, all_shifts, shift_tokens

__all__ = ["ARCHS", "RANKING_LOSSES", "BranchRunner", "DualPath", "ImageCNN", "PretrainedWeightsMissing", "TextCNN",
           "all_shifts", "build_model", "hardest_negatives", "imagenet_weights_path", "in_batch_ranking_loss",
           "instance_loss", "l2_normalize", "one_after_another", "param_groups", "ranking_loss", "set_stage",
           "shift_tokens", "top1_accuracy", "total_loss"]
