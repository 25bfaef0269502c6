"""Benchmark: how far bf16 autocast drifts from fp32 in the same short training run (BENCHMARKS.md section 8).

The same Stage I + Stage II run (same seed: same initialisation, batches, crops, shifts and dropout masks) is
trained twice on the synthetic dataset, once in fp32 and once under bf16 autocast, and a third time in fp32 with
another seed: the seed-to-seed spread is the yardstick against which the bf16 drift is judged. Reported per stage:
the loss of the first step (same weights, so a purely numerical difference), the mean and max |loss difference|
over the steps, and the final val metrics (R@1/5/10 both directions, rsum) of each run.

Model: configs/demo.yaml shrunk further for CPU time (bf16 autocast is emulated, ~4x slower than fp32, on CPUs
without native bf16): ResNet-18 on 32-px crops, 1/8-width text CNN, 128-d embedding, a randomly initialised
backbone (``--pretrained none --backbone_bn update``). The val metrics of every run are computed in fp32 after
training, so they show the effect of the training numerics alone. It is a tiny model and a short run: it shows
whether bf16 moves the training trajectory more than a change of seed does, not what bf16 does to the paper's
full-size numbers (unmeasured).

    .venv/bin/python bench/precision_drift.py                      # ~5 min on 2 busy cores
    .venv/bin/python bench/precision_drift.py --epochs1 1 --epochs2 1 --no-write
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np

from common import DEFAULT_CACHE, add_output_args, build_trainer, report, synthetic_prepared, table
from utils.cli import ArgumentParser  # noqa: E402  (one-line usage errors)

HEADING = "## 8. Precision: fp32 vs bf16 autocast drift"
CONFIG = "configs/demo.yaml"
MODEL = {"pretrained": "none", "backbone_bn": "update", "train_crop": 32, "text_width": 0.125, "feature_dim": 128}
METRICS = [("i2t", "R@1"), ("i2t", "R@5"), ("i2t", "R@10"), ("t2i", "R@1"), ("t2i", "R@5"), ("t2i", "R@10")]


def train(stage: int, data: Path, run_dir: Path, precision: str, seed: int, epochs: int,
          init: Path | None) -> tuple[list[float], dict, float]:
    """One stage; returns (per-step total loss, val metrics in fp32 after training, training seconds)."""
    from engine.loop import validate

    overrides = {**MODEL, "precision": precision, "seed": seed, "lr_schedule": [[epochs, 1.0]], "val_every": epochs,
                 "workers": 0, "log_every": 10_000, "channels_last": False}
    trainer = build_trainer(CONFIG, stage, data, run_dir, overrides, stage1_ckpt=init)
    trainer._validate = lambda record: False  # validated below, in fp32 for every run
    losses: list[float] = []
    step = trainer.train_step

    def logged(batch):  # the loss the optimiser saw at every step (read back: a sync per step)
        step(batch)
        losses.append(trainer.step_values()["loss/total"])

    trainer.train_step = logged
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    metrics, _ = validate(trainer.module, trainer.data, dataclasses.replace(trainer.cfg, precision="fp32"),
                          trainer.device)
    return losses, metrics, seconds


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-images", type=int, default=64, help="synthetic training images = classes")
    ap.add_argument("--holdout", type=int, default=50, help="val (and test) images")
    ap.add_argument("--epochs1", type=int, default=5, help="Stage I epochs (batch 32)")
    ap.add_argument("--epochs2", type=int, default=1, help="Stage II epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE / "precision")
    add_output_args(ap)
    args = ap.parse_args()
    data = synthetic_prepared(args.train_images, 36, args.cache, holdout=args.holdout)
    runs = {"fp32": ("fp32", args.seed), "bf16": ("bf16", args.seed), "fp32, seed+1": ("fp32", args.seed + 1)}
    res: dict[str, dict] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, (precision, seed) in runs.items():
            out = Path(tmp) / name.replace(", ", "_").replace("+", "p")
            l1, v1, s1 = train(1, data, out / "stage1", precision, seed, args.epochs1, None)
            l2, v2, s2 = train(2, data, out / "stage2", precision, seed, args.epochs2, out / "stage1" /
                               "checkpoint_last.pt")
            res[name] = {"loss": {1: np.array(l1), 2: np.array(l2)}, "val": {1: v1, 2: v2}, "s": s1 + s2}
            print(f"[bench] {name}: stage I {s1:.0f} s, stage II {s2:.0f} s of training; val rsum "
                  f"{v1['rsum']:.1f} / {v2['rsum']:.1f}", flush=True)
    ref = res["fp32"]
    rows = []
    for name, r in res.items():
        for st in (1, 2):
            d = np.abs(r["loss"][st] - ref["loss"][st])
            v = r["val"][st]
            rows.append([name, "I" if st == 1 else "II", len(r["loss"][st]), f"{r['loss'][st][0]:.6f}",
                         f"{d.mean():.4f}", f"{d.max():.4f}", f"{r['loss'][st][-1]:.4f}",
                         *[f"{v[dr][m]:.1f}" for dr, m in METRICS], f"{v['rsum']:.1f}"])
    lines = table(["run", "stage", "steps", "first-step loss", "mean abs dloss vs fp32", "max abs dloss vs fp32",
                   "last loss", *[f"val {d} {m}" for d, m in METRICS], "val rsum"], rows)
    notes = [f"configs/demo.yaml with {' '.join(f'--{k} {v}' for k, v in MODEL.items())}; synthetic data "
             f"({args.train_images} train classes, {args.holdout} val images, 36 px), batch 32, Stage I "
             f"{args.epochs1} epochs then Stage II {args.epochs2} epochs (hard negatives); 'dloss' = per-step total "
             f"loss minus the fp32 run's at the same step; val metrics computed in fp32 after each stage. Training "
             f"seconds fp32 / bf16: {res['fp32']['s']:.0f} / {res['bf16']['s']:.0f}; wall time "
             f"{time.perf_counter() - t_all:.0f} s for the 3 runs.",
             "The third run changes only the seed (initialisation, batch order, crops, shifts, dropout): its "
             "distance from the fp32 run is the yardstick for the bf16 drift."]
    report(args, HEADING, "fp32 vs bf16 autocast vs another seed, same short run", notes, lines)


if __name__ == "__main__":
    main()
