"""Checkpoints: full training state, written atomically, read with ``weights_only=True``.

A checkpoint holds the model, optimizer, LR schedule and AMP-scaler states, every RNG state (python, numpy, torch,
CUDA), the position in training (epoch, step within the epoch, global step), the best validation score and the
config. ``save_atomic`` writes it with ``utils.files.atomic_write`` (a temporary file in the same directory renamed into
place), so a process killed at any moment leaves either the previous checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.cli import UserError
from utils.files import atomic_write

LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be read (the message names it)."""


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    with atomic_write(path) as f:
        torch.save(obj, f)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e


def load_training(path: str | Path, map_location: str | torch.device = "cpu", *, option: str = "--checkpoint",
                  mmap: bool = False) -> dict[str, Any]:
    """``load`` for a checkpoint written by train_stage1.py / train_stage2.py (it has ``model`` and ``config``).
    Anything else, e.g. a backbone state dict such as the demo's ``backbone_resnet18.pth``, is a CheckpointError
    naming ``option`` and the file. ``mmap``: map the file instead of reading it (a cheap check before training)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{option} {path}: checkpoint not found (expected a checkpoint_*.pt written by "
                              f"train_stage1.py / train_stage2.py)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"{option} {path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    missing = [k for k in ("model", "config") if not isinstance(state, dict) or k not in state]
    if missing:
        plain = isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
        raise CheckpointError(
            f"{option} {path}: not a DualPath training checkpoint (missing {missing}"
            + ("; it is a plain state dict, e.g. a backbone: pass such a file to train_stage1.py --pretrained"
               if plain else "") + "); expected a checkpoint_*.pt written by train_stage1.py / train_stage2.py, "
            "e.g. RUN_DIR/stage1/checkpoint_last.pt")
    return state
