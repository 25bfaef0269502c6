"""Rebuild a trained DualPath from a checkpoint, for inference (search, evaluation).

``load_model(checkpoint, data, device)`` reads the checkpoint with ``weights_only=True`` (``engine.checkpoint.load``),
checks that it was trained on prepared data of the same shape (dictionary size, max_len, number of classes) as
``data``, rebuilds the network exactly as training did (``engine.loop.make_model`` with the checkpoint's own
config: no pretrained weights are read) and returns it on ``device`` in eval mode, with the checkpoint dict.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models import DualPath
from utils.cli import InvalidValue

from . import checkpoint as ckpt_io
from .data import Prepared

CHECKED_KEYS = ("vocab_size", "max_len", "num_classes")


class CheckpointMismatch(InvalidValue):
    """The checkpoint does not fit the prepared data (a file that is no training checkpoint at all is
    ``engine.checkpoint.CheckpointError``)."""


def load_model(checkpoint_path: str | Path, data: Prepared | str | Path,
               device: str | torch.device = "cpu") -> tuple[DualPath, dict[str, Any]]:
    from .config import config_from_dict
    from .loop import make_model

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
