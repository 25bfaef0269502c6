"""Benchmark: the training data pipeline (BENCHMARKS.md section 2), to choose --workers from numbers.

Measures ``engine.data.TrainBatches`` (decode + original crop + bicubic resize + flip + caption position shift; Stage
II also the hard-negative candidate pool) in samples (= images) per second:

* in-process (0 workers, 1 torch thread as in a DataLoader worker): the rate of ONE worker;
* through a DataLoader as the Trainer builds it (batch_size=None, pin_memory on CUDA, persistent_workers off,
  the config's prefetch_factor) for each worker count, then at the largest count with persistent_workers on,
  other prefetch factors and (CUDA) pin_memory off. Each loader runs 2 epochs of K batches; reported: the wait
  for the first batch of each epoch (worker start-up), the steady rate (second half of each epoch) and the overall
  rate including start-ups. The consumer only moves the batch to the device (non_blocking, as train_step does);
* on the device, per batch: host-to-device copy (pageable / pinned, CUDA) and the input normalisation.

It also measures (or takes, --model-rate) what the model consumes: pairs/s of the model's own step (see
bench/train_throughput.py (b)) and recommends the smallest worker count whose steady rate is >= 1.25 x that.

    .venv/bin/python bench/loader_throughput.py                     # config and data defaults of this device
    .venv/bin/python bench/loader_throughput.py --workers 1 2 4 8 --model-rate 900
    .venv/bin/python bench/loader_throughput.py --batches 4 --inprocess 2 --model-rate none --no-write
"""
from __future__ import annotations

import argparse
import gc
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import common  # noqa: F401  (puts the repository root on sys.path)
from common import (DEFAULT_CACHE, add_output_args, build_trainer, default_image_size, device, model_pairs_per_s,
                    report, synthetic_prepared, table, time_repeated, usable_cores)

HEADING = "## 2. Data pipeline"
MARGIN = 1.25


from utils.cli import ArgumentParser  # noqa: E402

if TYPE_CHECKING:
    import torch


def run_loader(ds, workers: int, pin: bool, persistent: bool, prefetch: int, epochs: int, k: int,
               dev: torch.device) -> dict[str, float]:
    import torch
    from torch.utils.data import DataLoader

    n = len(ds)
    loader = DataLoader(ds, batch_size=None, sampler=[i % n for i in range(k)], num_workers=workers,
                        pin_memory=pin, persistent_workers=persistent, prefetch_factor=prefetch,
                        generator=torch.Generator())
    firsts, steadies, samples = [], [], 0
    t_all = time.perf_counter()
    for _ in range(epochs):
        t0, times = time.perf_counter(), []
        for batch in loader:
            batch["images"].to(dev, non_blocking=True)
            times.append(time.perf_counter())
            samples += len(batch["images"])
        firsts.append(times[0] - t0)
        h = len(times) // 2
        steadies.append(len(batch["images"]) * (len(times) - 1 - h) / max(times[-1] - times[h], 1e-9))
    total = time.perf_counter() - t_all
    del loader
    gc.collect()
    return {"first": firsts, "steady": sum(steadies) / len(steadies), "overall": samples / total}


def device_side(ds, dev: torch.device, channels_last: bool, reps: int) -> list[list[str]]:
    """ms per batch and samples/s of the H2D copy (CUDA) and of the model's input normalisation on the device."""
    import torch

    from models.image_cnn import IMAGENET_MEAN, IMAGENET_STD, normalize_pixels

    mean = torch.tensor([255 * m for m in IMAGENET_MEAN], device=dev)  # the torchvision style's constants
    std = torch.tensor([255 * s for s in IMAGENET_STD], device=dev)
    images = ds[0]["images"]
    b = len(images)
    rows = []
    if dev.type == "cuda":
        pinned = images.pin_memory()
        for name, src in (("host-to-device copy, pageable", images), ("host-to-device copy, pinned", pinned)):
            dt = time_repeated(lambda: src.to(dev, non_blocking=True), reps, dev)
            rows.append([name, f"{1000 * dt:.2f}", f"{b / dt:.0f}"])
    x = images.to(dev)
    dt = time_repeated(lambda: normalize_pixels(x, mean, std, channels_last), reps, dev)
    rows.append([f"input normalisation on {dev.type}{' (channels_last)' if channels_last else ''}", f"{1000 * dt:.2f}",
                 f"{b / dt:.0f}"])
    return rows


def main() -> None:
    cores = usable_cores()
    default_workers = sorted({w for w in (1, 2, 4, 8, 16, 32) if w <= cores} | {cores})
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, choices=(1, 2), default=1, help="batches of this stage (default 1: the "
                    "fastest model step, the most demanding for the loader)")
    ap.add_argument("--config", default=None, help="config file; {stage} is replaced by the stage (default "
                    "configs/flickr30k_stage{stage}.yaml on CUDA, configs/demo.yaml on CPU)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: config")
    ap.add_argument("--workers", type=int, nargs="+", default=default_workers, help="default %(default)s")
    ap.add_argument("--prefetch", type=int, nargs="+", default=[2, 8],
                    help="other prefetch factors tried at the largest worker count (default %(default)s)")
    ap.add_argument("--batches", type=int, default=None,
                    help="batches per epoch of a loader run (default max(16, 4 x workers x prefetch))")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--inprocess", type=int, default=8, help="batches timed in-process (default %(default)s)")
    ap.add_argument("--model-rate", default="measure",
                    help="pairs/s the model consumes: a number, 'measure' (default) or 'none'")
    ap.add_argument("--model-steps", type=int, default=None, help="default 20 on CUDA, 3 on CPU")
    ap.add_argument("--pretrained", default="none")
    ap.add_argument("--data", type=Path, default=None, help="a prepared directory (default: synthetic, cached)")
    ap.add_argument("--train-images", type=int, default=None, help="synthetic training images (default 29783 on "
                    "CUDA, 600 on CPU; batches repeat when an epoch asks for more)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    add_output_args(ap)
    args = ap.parse_args()
    if min(args.workers) < 1:
        ap.error("--workers: counts >= 1 (the in-process rate is always measured)")
    import torch  # after parsing: --help answers at once (docs/cli.md)

    cuda = torch.cuda.is_available()
    args.config = args.config or ("configs/flickr30k_stage{stage}.yaml" if cuda else "configs/demo.yaml")
    args.model_steps = args.model_steps or (20 if cuda else 3)
    from engine.config import load_config
    from engine.data import Prepared, TrainBatches, TrainSpec

    overrides = {"pretrained": args.pretrained, **({"batch_size": args.batch_size} if args.batch_size else {})}
    cfg = load_config(common.config_path(args.config, args.stage), overrides, stage=args.stage)
    data = args.data or synthetic_prepared(args.train_images or (29783 if cuda else 600),
                                           args.image_size or default_image_size(cfg.train_crop), args.cache)
    dev = device()
    model_rate = None
    if args.model_rate == "measure":
        with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
            trainer = build_trainer(args.config, args.stage, data, Path(tmp), overrides)
            model_rate = model_pairs_per_s(trainer, trainer.batches[0], args.model_steps, warmup=2)
            del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        print(f"model's own step: {model_rate:.1f} pairs/s", flush=True)
    elif args.model_rate != "none":
        model_rate = float(args.model_rate)
    channels_last = cuda and cfg.channels_last
    spec = TrainSpec(stage=args.stage, batch_size=cfg.batch_size, crop=cfg.train_crop, seed=cfg.seed,
                     position_shift=cfg.position_shift, negatives=cfg.negatives, num_candidates=cfg.num_candidates)
    ds = TrainBatches(Prepared(data), spec)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (torch.stack would otherwise use every core)
    ds[0]
    t0 = time.perf_counter()
    for b in range(args.inprocess):
        ds[b % len(ds)]
    per_worker = cfg.batch_size * args.inprocess / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    print(f"in-process: {per_worker:.1f} samples/s", flush=True)

    def x_model(rate: float) -> str:
        return f"{rate / model_rate:.2f}" if model_rate else "–"
    rows = [["0 (in-process)", "–", "–", "–", "–", f"{per_worker:.1f}", "–", x_model(per_worker)]]
    wmax, pf = max(args.workers), cfg.prefetch_factor
    runs = [(w, cuda, False, pf) for w in sorted(args.workers)] + [(wmax, cuda, True, pf)]
    runs += [(wmax, cuda, False, p) for p in args.prefetch if p != pf] + ([(wmax, False, False, pf)] if cuda else [])
    steady_by_workers = {}
    for w, pin, persistent, prefetch in runs:
        k = args.batches or max(16, 4 * w * prefetch)
        r = run_loader(ds, w, pin, persistent, prefetch, args.epochs, k, dev)
        if not persistent and pin == cuda and prefetch == pf:
            steady_by_workers[w] = r["steady"]
        rows.append([w, "on" if pin else "off", "on" if persistent else "off", prefetch,
                     " / ".join(f"{x:.2f}" for x in r["first"]), f"{r['steady']:.1f}", f"{r['overall']:.1f}",
                     x_model(r["steady"])])
        print(f"workers {w} pin {pin} persistent {persistent} prefetch {prefetch}: steady {r['steady']:.1f}, "
              f"overall {r['overall']:.1f} samples/s", flush=True)

    if model_rate:
        need = MARGIN * model_rate
        ok = [w for w, rate in sorted(steady_by_workers.items()) if rate >= need]
        estimate = math.ceil(need / per_worker)
        if ok:
            rec = (f"**Recommendation: --workers {ok[0]}** (steady {steady_by_workers[ok[0]]:.0f} samples/s >= "
                   f"{MARGIN} x the model's {model_rate:.0f} pairs/s; in-process rate {per_worker:.0f}/worker -> "
                   f"estimate {estimate}).")
        else:
            rec = (f"**Recommendation: data-bound here**: {max(steady_by_workers)} workers give "
                   f"{max(steady_by_workers.values()):.0f} samples/s < {MARGIN} x {model_rate:.0f}; at "
                   f"{per_worker:.0f} samples/s per worker about {estimate} workers are needed ({cores} cores here).")
        if not cuda:
            rec += " On CPU the workers share the cores with the model's own computation."
    else:
        rec = f"No model rate (--model-rate none); one worker delivers {per_worker:.0f} samples/s in-process."
    print(rec)
    title = (f"Stage {args.stage} batches of {cfg.batch_size}, {cfg.train_crop}-px crops"
             f"{f', {cfg.num_candidates} candidates' if args.stage == 2 else ''}, {dev.type}")
    p = Prepared(data)
    notes = [f"Data: {data} ({len(p.split_images('train'))} training images, prepared at "
             f"{p.manifest.get('image_resize', {}).get('size')} px). Model's own step "
             f"({Path(args.config).name}, stage {args.stage}): "
             + (f"{model_rate:.1f} pairs/s ({'measured' if args.model_rate == 'measure' else 'given'})."
                if model_rate else "not measured."),
             f"Epochs per loader run: {args.epochs}; first batch = wait for the first batch of each epoch; "
             f"steady = second half of each epoch; overall = all samples / all time incl. start-ups.", "", rec]
    lines = table(["workers", "pin_memory", "persistent", "prefetch", "first batch s", "steady samples/s",
                   "overall samples/s", "steady / model"], rows, "lllrrrrr")
    dev_rows = device_side(ds, dev, channels_last, reps=20 if cuda else 5)
    lines += [""] + table(["on the device, per batch of " + str(cfg.batch_size), "ms", "samples/s"], dev_rows)
    report(args, HEADING, title, notes, lines)


if __name__ == "__main__":
    main()
