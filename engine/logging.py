"""TensorBoard and console logging (rank 0 only). tqdm progress bars are quiet when stderr is not a TTY."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm


class RunLogger:
    """Writes scalars and images to ``RUN_DIR/tb`` and prints epoch summaries. A no-op on ranks other than 0.

    The TensorBoard writer (and so ``RUN_DIR/tb/events.*``) is created at the first scalar or image, not here: a run
    refused while it is being set up (bad --data, --init, --pretrained) leaves no run directory behind."""

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tb_dir = Path(run_dir) / "tb"
        self.writer = None

    def _writer(self):
        if self.writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.tb_dir))
        return self.writer

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer() is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, float(value), step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        """rgb: (H, W, 3) uint8."""
        if self._writer() is not None:
            self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def print(self, msg: str) -> None:
        if self.enabled:
            tqdm.write(msg, file=sys.stderr)

    def progress(self, total: int, initial: int, desc: str) -> tqdm:
        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False,
                    disable=not (self.enabled and sys.stderr.isatty()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def retrieval_scalars(prefix: str, metrics: dict) -> dict[str, float]:
    """Flatten {"i2t": {"R@1": ..}, "t2i": {..}, "rsum": ..} to TensorBoard tags ``prefix/i2t_R@1`` ..."""
    out = {}
    for direction in ("i2t", "t2i"):
        for key, value in metrics.get(direction, {}).items():
            out[f"{prefix}/{direction}_{key}"] = value
    if "rsum" in metrics:
        out[f"{prefix}/rsum"] = metrics["rsum"]
    return out
