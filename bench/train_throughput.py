"""Benchmark: training throughput of the REAL loop against the model's own step (BENCHMARKS.md section 1).

For each stage, batch size and worker count:

(a) the real loop: ``engine.loop.Trainer._run_epoch`` on a prepared dataset, unchanged (its DataLoader with workers
    and pinned memory, uint8 -> device normalisation, hard-negative mining, the loss check, TensorBoard logging, the
    progress bar). ``train_step`` and ``log.scalars`` are wrapped only to take timestamps; the run is stopped after
    W warm-up + N measured steps (all in the first epoch, so no validation or checkpoint falls in the window).
(b) the model's own step: forward + loss + backward + optimizer step of the same Trainer's model and optimizer on
    one batch already on the device (normalised, negatives already mined), re-used N times; no mining, no host
    sync, no logging. This is the limit (a) can approach. Goal: (a) >= 80 % of (b).

Reported: pairs/s (a), (b), a/b; fractions of the loop time (a) spent waiting for data, mining (the Trainer's own
clock, not CUDA-synchronised) and logging; and the mining alone timed with synchronisation, as a fraction of (a)'s
step time.

Defaults: on CPU configs/demo.yaml (ResNet-18, 64-px crops, demo widths) on the synthetic dataset prepared at 72 px;
on CUDA the paper recipe configs/flickr30k_stage{1,2}.yaml (ResNet-50, 224, batch 32, its precision, channels_last)
with --pretrained none, on the synthetic dataset prepared at 256 px with 29,783 training images (Flickr30k's
number of classes, so the shared W has its real size). Datasets are cached under runs/bench_data/.

    .venv/bin/python bench/train_throughput.py                       # defaults of this device
    .venv/bin/python bench/train_throughput.py --batch-size 32 128 --workers 4 8
    .venv/bin/python bench/train_throughput.py --stage 1 --steps 2 --warmup 1 --train-images 128 --no-write
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import common  # noqa: F401  (puts the repository root on sys.path)
from common import (DEFAULT_CACHE, add_output_args, build_trainer, default_image_size, device, model_step_fn,
                    report, synthetic_prepared, table, time_repeated)

from utils.cli import ArgumentParser  # noqa: E402

if TYPE_CHECKING:
    import torch

HEADING = "## 1. Training step: real loop vs the model's own step"
FLICKR30K_CLASSES = 29783


class _Done(Exception):
    pass


class _TimedLoader:
    """Iterates the Trainer's own DataLoader, recording the (start, end) of every wait for a batch."""

    def __init__(self, loader, spans: list) -> None:
        self.loader, self.spans = loader, spans

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.spans.append((t0, time.perf_counter()))
            yield batch


def _within(spans: list, t0: float, t1: float) -> float:
    return sum(b - a for a, b in spans if t0 <= a < t1)


def measure_loop(trainer, warmup: int, steps: int) -> dict[str, float]:
    """Run Trainer._run_epoch until warmup + steps steps are done; statistics of the last ``steps``."""
    calls, rets, mining, logs, waits = [], [], [], [], []
    step_fn, scalars_fn, loader_fn = trainer.train_step, trainer.log.scalars, trainer._loader

    def train_step(batch):
        calls.append(time.perf_counter())
        values = step_fn(batch)
        rets.append(time.perf_counter())
        mining.append(values["time/mining_s"])
        if len(rets) == warmup + steps:
            raise _Done
        return values

    def scalars(values, step):
        t0 = time.perf_counter()
        scalars_fn(values, step)
        logs.append((t0, time.perf_counter()))

    # instance attributes shadow the methods; the wrappers only take timestamps
    trainer.train_step, trainer.log.scalars = train_step, scalars
    trainer._loader = lambda: _TimedLoader(loader_fn(), waits)
    trainer.epoch = trainer.batch = trainer.step = 0
    try:
        trainer._run_epoch()
        raise RuntimeError("the epoch ended before warmup + steps; use a larger dataset (--train-images)")
    except _Done:
        pass
    finally:
        del trainer.train_step, trainer.log.scalars, trainer._loader
        gc.collect()  # the aborted DataLoader iterator shuts its workers down
    w, n = warmup, steps
    t0, t1 = rets[w - 1], rets[w + n - 1]
    total = t1 - t0
    gaps = sum(calls[i] - rets[i - 1] for i in range(w, w + n))  # everything outside train_step
    wait, logging = _within(waits, t0, t1), _within(logs, t0, t1)
    return {"pairs_s": trainer.cfg.batch_size * n / total, "step_s": total / n, "wait": wait / total,
            "mining": sum(mining[w:w + n]) / total, "logging": logging / total,
            "other": (gaps - wait - logging) / total}


def mining_alone_s(trainer, reps: int) -> float:
    """Seconds per call of Trainer._mine on one batch already on the device, synchronised."""
    batch = trainer.batches[0]
    images = trainer.module.image.normalize(batch["images"].to(trainer.device), trainer.channels_last)
    return time_repeated(lambda: trainer._mine(images, batch), reps, trainer.device, warmup=1)


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, nargs="+", choices=(1, 2), default=[1, 2])
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 100 on CUDA, 10 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps, >= 1 (default 20 on CUDA, 2 on CPU)")
    ap.add_argument("--repeats", type=int, default=1, help="best of R, (a) and (b) interleaved (default 1)")
    ap.add_argument("--model-steps", type=int, default=None, help="steps of (b) (default: --steps)")
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="DataLoader workers (default: config)")
    ap.add_argument("--batch-size", type=int, nargs="+", default=None, help="global batch (default: config)")
    ap.add_argument("--config", default=None, help="config file; {stage} is replaced by the stage (default "
                    "configs/flickr30k_stage{stage}.yaml on CUDA, configs/demo.yaml on CPU)")
    ap.add_argument("--pretrained", default="none", help="config override (default %(default)s: no weights here)")
    ap.add_argument("--data", type=Path, default=None, help="a prepared directory (default: synthetic, cached)")
    ap.add_argument("--train-images", type=int, default=None,
                    help=f"synthetic training images = classes (default {FLICKR30K_CLASSES} on CUDA, 600 on CPU, "
                         "raised to (warmup + steps) x batch when needed)")
    ap.add_argument("--image-size", type=int, default=None, help="synthetic prepared size (default 256 for 224, 72 for 64 "
                    "crops, 144 for 128 crops)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="synthetic data cache (default %(default)s)")
    add_output_args(ap)
    args = ap.parse_args()
    if (args.warmup is not None and args.warmup < 1) or (args.steps is not None and args.steps < 1):
        ap.error("--warmup and --steps must be >= 1")
    import torch  # after parsing: --help answers at once (docs/cli.md)

    cuda = torch.cuda.is_available()
    args.steps = args.steps or (100 if cuda else 10)
    args.warmup = args.warmup or (20 if cuda else 2)
    args.config = args.config or ("configs/flickr30k_stage{stage}.yaml" if cuda else "configs/demo.yaml")
    from engine.config import load_config

    stages = sorted(set(args.stage))
    base = load_config(common.config_path(args.config, stages[0]), {"pretrained": args.pretrained},
                       stage=stages[0])
    batch_sizes = args.batch_size or [base.batch_size]
    worker_counts = sorted(set(args.workers or [base.workers]))
    needed = (args.warmup + args.steps) * max(batch_sizes)
    data = args.data
    if data is None:
        n_train = max(args.train_images or (FLICKR30K_CLASSES if cuda else 600), needed)
        data = synthetic_prepared(n_train, args.image_size or default_image_size(base.train_crop), args.cache)
    dev = device()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for bs in batch_sizes:
            ckpt1 = None
            for stage in stages:
                run = Path(tmp) / f"b{bs}_s{stage}"
                overrides = {"pretrained": args.pretrained, "batch_size": bs}
                trainer = build_trainer(args.config, stage, data, run, overrides, stage1_ckpt=ckpt1)
                if stage == 1 and 2 in stages:
                    trainer.save()
                    ckpt1 = run / "checkpoint_last.pt"
                cfg = trainer.cfg
                if len(trainer.batches) < args.warmup + args.steps:
                    raise SystemExit(f"{data}: {len(trainer.batches)} batches of {bs} per epoch < warmup + steps")
                loops: dict[int, list] = {w: [] for w in worker_counts}
                models = []
                model_step = model_step_fn(trainer, trainer.batches[0])
                for _ in range(args.repeats):  # interleaved, so that a change of load hits (a) and (b) alike
                    for w in worker_counts:
                        trainer.cfg.workers = w
                        loops[w].append(measure_loop(trainer, args.warmup, args.steps))
                        print(f"stage {stage} batch {bs} workers {w}: loop {loops[w][-1]['pairs_s']:.1f} pairs/s",
                              flush=True)
                    models.append(bs / time_repeated(model_step, args.model_steps or args.steps, dev,
                                                     warmup=min(args.warmup, 5)))
                    print(f"stage {stage} batch {bs}: model step {models[-1]:.1f} pairs/s", flush=True)
                model = max(models)
                hard = stage == 2 and cfg.negatives == "hard"
                mine = mining_alone_s(trainer, max(3, args.steps // 4)) if hard else 0.0
                for w in worker_counts:
                    m = max(loops[w], key=lambda r: r["pairs_s"])
                    ratio = m["pairs_s"] / model
                    rows.append([stage, bs, w, f"{m['pairs_s']:.1f}", f"{model:.1f}", f"{100 * ratio:.0f} %",
                                 "yes" if ratio >= 0.8 else "**no**", f"{100 * m['wait']:.1f} %",
                                 f"{100 * m['mining']:.1f} %" if hard else "–",
                                 f"{1000 * mine:.1f} ms = {100 * mine / m['step_s']:.1f} %" if hard else "–",
                                 f"{100 * m['logging']:.1f} %", f"{100 * m['other']:.1f} %"])
                del trainer
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
    from engine.data import Prepared

    p = Prepared(data)
    cand = load_config(common.config_path(args.config, 2), {}, stage=2).num_candidates if 2 in stages else "–"
    precision = (("bf16 autocast" if base.precision in ("auto", "bf16") else base.precision)
                 + (" + channels_last" if base.channels_last else "")) if cuda else "fp32"
    title = (f"{Path(args.config).name}: {base.arch}, crop {base.train_crop}, feature {base.feature_dim}, text "
             f"width {base.text_width}, {p.num_classes} classes, {precision}, "
             f"{args.steps} steps after {args.warmup} warm-up, best of {args.repeats}, {dev.type}")
    kind = "synthetic, Flickr30k formats" if args.data is None else p.manifest.get("dataset")
    notes = [f"Data: {data} ({kind}, {len(p.split_images('train'))} training images, prepared "
             f"at {p.manifest.get('image_resize', {}).get('size')} px); pretrained {args.pretrained}; hard-negative "
             f"candidates {cand}; prefetch_factor {base.prefetch_factor}, log_every "
             f"{base.log_every}.",
             "(a) = Trainer._run_epoch as is (real DataLoader, mining, logging); (b) = the same model's forward + "
             "backward + optimizer step on one batch already on the device. Fractions are of (a)'s loop time; "
             "'data wait' = time in next() of the Trainer's DataLoader; 'mining' = the Trainer's own clock (not "
             "CUDA-synchronised); 'mining alone' = Trainer._mine timed synchronised, as a share of (a)'s step time; "
             "'other' = the rest outside train_step (progress bar, stop-signal check)."]
    lines = table(["stage", "batch", "workers", "(a) loop pairs/s", "(b) model step pairs/s", "a/b", ">= 80 %",
                   "data wait", "mining", "mining alone", "logging", "other"], rows, "r" * 12)
    report(args, HEADING, title, notes, lines)


if __name__ == "__main__":
    main()
