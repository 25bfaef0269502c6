"""Feature caches of search and the browser: .npz files written atomically, keyed so that a cache written for another
checkpoint, prepared directory or setting is never used (it is re-encoded and rewritten instead).

Keys: ``checkpoint_key`` (resolved path + modification time of a checkpoint) or ``model_fingerprint`` (a hash of the
weights); every file also records ``CACHE_VERSION``. Folder caches live in the folder, caption caches next to the
checkpoint (the prepared directory stays read-only).
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from engine.data import Prepared
from utils.files import atomic_write

CACHE_VERSION = 1


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def save_npz(path: Path, **arrays: np.ndarray) -> bool:
    """Write an .npz atomically (``utils.files``); False (with a note) when it cannot be written."""
    try:
        with atomic_write(path) as f:
            np.savez(f, **arrays)
        return True
    except OSError as e:
        _note(f"note: cannot write the feature cache {path} ({e.strerror or e}); features are not cached")
        return False


def read_npz(path: Path | None, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file written for ``key``; None when absent, unreadable or for another model."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError) as e:
        _note(f"note: ignoring the unreadable feature cache {path} ({e}); it will be rewritten")
        return None
    if int(arrays.get("version", -1)) != CACHE_VERSION or str(arrays.get("key", "")) != key:
        _note(f"note: the feature cache {path} was written for another model or settings; re-encoding")
        return None
    return arrays


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every weight and buffer (the cache key when the caller gives none)."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def checkpoint_key(checkpoint: str | Path) -> str:
    """Identity of a checkpoint file for cache names: resolved path + modification time."""
    p = Path(checkpoint).resolve()
    return f"{p}@{p.stat().st_mtime_ns}"


def short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def default_image_cache(folder: str | Path, checkpoint: str | Path) -> Path:
    return Path(folder) / f".dualpath_cache_{short_hash(checkpoint_key(checkpoint))}.npz"


def default_caption_cache(checkpoint: str | Path, data: Prepared, split: str) -> Path:
    """Next to the checkpoint (the prepared directory stays read-only)."""
    key = f"{checkpoint_key(checkpoint)}|{data.root.resolve()}|{split}"
    return Path(checkpoint).resolve().parent / f".dualpath_captions_{split}_{short_hash(key)}.npz"
