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
