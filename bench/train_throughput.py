"""Benchmark: training throughput of the REAL loop against the model's own step, eager and captured side by side
(BENCHMARKS.md section 1).

For each stage, batch size, step mode (``compile``: off = eager, cuda_graph = captured once and replayed; "+ streams":
``branch_streams: true``, the image and text paths side by side on two CUDA streams), precision and worker count:

(a) the real loop: ``engine.loop.Trainer._run_epoch`` on a prepared dataset, unchanged (its one DataLoader iterator
    with workers and pinned memory, the step with mining, the device-side statistics read every ``log_every``
    steps, TensorBoard, the progress bar). ``train_step``, ``_next_batch`` and ``_log_window`` are wrapped only to
    take timestamps; the device is synchronised after the warm-up steps and after the last step, so the window is
    the device's time too. The run stops after W warm-up + N measured steps, inside the first epoch (no validation
    or checkpoint in the window).
(b) the model's own step: the same Trainer's step (``TrainStep.run``, the same mode: mining, forward, losses,
    backward, optimizer step) on one batch already on the device, repeated N times. The limit (a) can approach.
    Goal: (a) >= 90 % of (b).

Reported: pairs/s of (a) and (b), a/b; fractions of (a)'s window spent waiting for the loader, on the host inside
the step (launching work: near 100 % means the host, not the device, sets the pace), and reading the statistics
(the window's sync); the mining alone (eager, synchronised) as a share of (a)'s step time; on CUDA the peak device
memory allocated while the Trainer ran (what a GPU needs for the recipe in that step mode).

Defaults: on CPU configs/demo.yaml (ResNet-18, 64-px crops, demo widths) on the synthetic dataset prepared at 72 px,
eager only; on CUDA the recipe configs/flickr30k_stage{1,2}.yaml (ResNet-50, 224, batch 32, fp32 with TF32,
channels_last) with --pretrained none, eager and cuda_graph, on the synthetic dataset prepared at 256 px with
--train-images classes, the shared W padded to --classifier-classes rows (Flickr30k's 29,783: W at its real size
while the synthetic set stays small; labels use the first rows). Datasets are cached under runs/bench_data/.

    .venv/bin/python bench/train_throughput.py                       # defaults of this device
    .venv/bin/python bench/train_throughput.py --batch-size 32 128 --compile cuda_graph --precision fp32 bf16
    .venv/bin/python bench/train_throughput.py --compile cuda_graph inductor --branch-streams off on
    .venv/bin/python bench/train_throughput.py --stage 1 --steps 2 --warmup 1 --train-images 128 --no-write
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
from common import (add_output_args, add_recipe_args, build_trainer, default_image_size, device, model_step_fn,
                    pad_classifier, recipe_defaults, report, sync, synthetic_prepared, table, time_repeated)

from utils.cli import ArgumentParser  # noqa: E402

HEADING = "## 1. Training step: real loop vs the model's own step"


class _Done(Exception):
    pass


def measure_loop(trainer, warmup: int, steps: int) -> dict[str, float]:
    """Run Trainer._run_epoch until warmup + steps steps are done; statistics of the last ``steps``."""
    marks: list[float] = []  # device-synchronised: after step ``warmup`` and after the last step
    in_step: list[tuple[float, float]] = []
    waits: list[tuple[float, float]] = []
    logs: list[tuple[float, float]] = []
    step_fn, next_fn, log_fn = trainer.train_step, trainer._next_batch, trainer._log_window

    def timed(fn, spans):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            spans.append((t0, time.perf_counter()))
            return out
        return wrapper

    def train_step(batch):
        t0 = time.perf_counter()
        step_fn(batch)
        in_step.append((t0, time.perf_counter()))
        if len(in_step) in (warmup, warmup + steps):
            sync(trainer.device)
            marks.append(time.perf_counter())
            if len(marks) == 2:
                raise _Done

    # instance attributes shadow the methods; the wrappers only take timestamps
    trainer.train_step, trainer._next_batch = train_step, timed(next_fn, waits)
    trainer._log_window = timed(log_fn, logs)
    trainer.epoch = trainer.batch = trainer.step = 0
    trainer._iter = None
    try:
        trainer._run_epoch()
        raise RuntimeError("the epoch ended before warmup + steps; use a larger dataset (--train-images)")
    except _Done:
        pass
    finally:
        del trainer.train_step, trainer._next_batch, trainer._log_window
        trainer._iter = None
        gc.collect()  # the abandoned DataLoader iterator shuts its workers down
    t0, t1 = marks
    total = t1 - t0

    def within(spans):
        return sum(b - a for a, b in spans if t0 <= a < t1) / total
    return {"pairs_s": trainer.cfg.batch_size * steps / total, "step_s": total / steps, "wait": within(waits),
            "host_step": within(in_step), "log_sync": within(logs)}


def mining_alone_s(trainer, reps: int) -> float:
    """Seconds per call of the eager mining on one batch already on the device, synchronised."""
    batch = trainer.batches[0]
    images = trainer.module.image.normalize(batch["images"].to(trainer.device), trainer.channels_last)
    return time_repeated(lambda: trainer._mine(images, batch), reps, trainer.device, warmup=1)


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, nargs="+", choices=(1, 2), default=[1, 2])
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 100 on CUDA, 10 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps, >= 4 with cuda_graph (default 20 on "
                    "CUDA, 2 on CPU)")
    ap.add_argument("--repeats", type=int, default=1, help="best of R, (a) and (b) interleaved (default 1)")
    ap.add_argument("--model-steps", type=int, default=None, help="steps of (b) (default: --steps)")
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="DataLoader workers (default: the config's; auto: as training resolves it)")
    ap.add_argument("--batch-size", type=int, nargs="+", default=None, help="global batch (default: config)")
    ap.add_argument("--compile", nargs="+", choices=("off", "cuda_graph", "inductor"), default=None,
                    help="step modes, the config's compile values (default: off and cuda_graph on CUDA, off on CPU); "
                         "inductor = cuda_graph with the image CNN and the text CNN's blocks compiled by torch.compile "
                         "(opt-in, fp32, CUDA only)")
    ap.add_argument("--branch-streams", nargs="+", choices=("off", "on"), default=["off"],
                    help="the config's branch_streams: the image and text paths on two CUDA streams (default off; "
                         "'off on' measures both)")
    ap.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=None,
                    help="precisions (default: the config's)")
    add_recipe_args(ap)  # --config --pretrained --data --train-images (raised to (warmup + steps) x batch) ...
    ap.add_argument("--validate", action="store_true", help="also time one validation pass (the second of two) of "
                    "the first Trainer: the val split's images and captions, as each epoch's end runs it")
    add_output_args(ap)
    args = ap.parse_args()
    if (args.warmup is not None and args.warmup < 1) or (args.steps is not None and args.steps < 1):
        ap.error("--warmup and --steps must be >= 1")
    import torch  # after parsing: --help answers at once (docs/cli.md)

    cuda = torch.cuda.is_available()
    args.steps = args.steps or (100 if cuda else 10)
    args.warmup = args.warmup or (20 if cuda else 2)
    recipe_defaults(args, cuda)
    modes = args.compile or (["off", "cuda_graph"] if cuda else ["off"])
    from engine.config import load_config
    from engine.step import GRAPH_WARMUP

    if "on" in args.branch_streams and not cuda:
        ap.error("--branch-streams on needs CUDA")
    if {"cuda_graph", "inductor"} & set(modes) and args.warmup <= GRAPH_WARMUP:
        ap.error(f"--warmup must exceed the {GRAPH_WARMUP} eager steps before the capture")
    stages = sorted(set(args.stage))
    base = load_config(common.config_path(args.config, stages[0]), {"pretrained": args.pretrained},
                       stage=stages[0])
    batch_sizes = args.batch_size or [base.batch_size]
    precisions = args.precision or [base.precision]
    from engine.data import resolve_workers

    worker_counts = sorted(set(args.workers or [resolve_workers(base.workers, device())]))  # the config's (auto)
    needed = (args.warmup + args.steps) * max(batch_sizes)
    data = args.data
    if data is None:
        n_train = max(args.train_images, needed)
        data = synthetic_prepared(n_train, args.image_size or default_image_size(base.train_crop), args.cache)
    classes = args.classifier_classes
    dev = device()
    rows: list[list] = []
    val_note: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp, pad_classifier(classes):
        for bs in batch_sizes:
            ckpt1 = None
            for stage in stages:
                for precision in precisions:
                    for mode, streams in ((m, s) for m in modes for s in args.branch_streams):
                        run = Path(tmp) / f"b{bs}_s{stage}_{precision}_{mode}_{streams}"
                        overrides = {"pretrained": args.pretrained, "batch_size": bs, "compile": mode,
                                     "precision": precision, "branch_streams": streams == "on"}
                        trainer = build_trainer(args.config, stage, data, run, overrides, stage1_ckpt=ckpt1)
                        if stage == 1 and 2 in stages and ckpt1 is None:
                            trainer.save()
                            ckpt1 = run / "checkpoint_last.pt"
                        rows += measure(trainer, args, worker_counts, dev, stage, bs, precision,
                                        mode + (" + streams" if streams == "on" else ""))
                        if args.validate and not val_note:
                            val_note.append(validation_note(trainer))
                        del trainer
                        gc.collect()
                        if cuda:
                            torch.cuda.empty_cache()
    from engine.data import Prepared

    p = Prepared(data)
    cand = load_config(common.config_path(args.config, 2), {}, stage=2).num_candidates if 2 in stages else "–"
    title = (f"{Path(args.config).name}: {base.arch}, crop {base.train_crop}, feature {base.feature_dim}, text "
             f"width {base.text_width}, W {max(classes, p.num_classes)} classes"
             f"{' + channels_last' if base.channels_last and cuda else ''}, {args.steps} steps after "
             f"{args.warmup} warm-up, best of {args.repeats}, {dev.type}")
    kind = "synthetic, Flickr30k formats" if args.data is None else p.manifest.get("dataset")
    notes = [f"Data: {data} ({kind}, {len(p.split_images('train'))} training images = classes, prepared at "
             f"{p.manifest.get('image_resize', {}).get('size')} px; the shared W padded to {max(classes, p.num_classes)}"
             f" rows); pretrained {args.pretrained}; hard-negative candidates {cand}; prefetch_factor "
             f"{base.prefetch_factor}, log_every {base.log_every}.",
             "(a) = Trainer._run_epoch as is (one DataLoader iterator, the step, statistics read every log_every "
             "steps); (b) = the same Trainer's step (same mode, mining included) on one batch already on the device. "
             "Fractions are of (a)'s synchronised window: 'data wait' = in the loader's next(); 'host in step' = "
             "the host inside train_step (launching); 'log + sync' = reading the statistics; 'mining alone' = the "
             "eager mining timed synchronised, as a share of (a)'s step time; 'peak GiB' = "
             "torch.cuda.max_memory_allocated over this Trainer's runs (model, optimizer state, inputs and the "
             "captured graph's pool; CUDA only).", *val_note]
    lines = table(["stage", "batch", "compile", "precision", "workers", "(a) loop pairs/s", "(b) model step pairs/s",
                   "a/b", ">= 90 %", "data wait", "host in step", "log + sync", "mining alone", "peak GiB"], rows,
                  "r" * 14)
    report(args, HEADING, title, notes, lines)


def validation_note(trainer) -> str:
    """One validation pass (engine.loop.validate, as at an epoch's end), timed the second time (cuDNN autotuned)."""
    from engine.loop import validate

    n_img, n_cap = len(trainer.data.split_images("val")), len(trainer.data.split_captions("val"))
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        validate(trainer.module, trainer.data, trainer.cfg, trainer.device, trainer.channels_last)
        sync(trainer.device)
        times.append(time.perf_counter() - t0)
    trainer.model.train()
    return (f"Validation pass ({trainer.cfg.arch}, {n_img} val images, {n_cap} captions, every position shift; "
            f"eval_batch_size {trainer.cfg.eval_batch_size}): {times[1]:.2f} s (first {times[0]:.2f} s).")


def measure(trainer, args, worker_counts, dev, stage, bs, precision, mode) -> list[list]:
    """Rows of one Trainer: (a) per worker count, (b), mining alone."""
    full = len(trainer.batches) - (trainer.batches.last_size > 0)  # timed steps are full batches
    if full < args.warmup + args.steps:
        raise SystemExit(f"{full} full batches of {bs} per epoch < warmup + steps")
    import torch

    cuda = trainer.device.type == "cuda"
    if cuda:  # the peak over this Trainer's loop and model-step runs (model, optimizer, graph pools included)
        torch.cuda.reset_peak_memory_stats(trainer.device)
    loops: dict[int, list] = {w: [] for w in worker_counts}
    models = []
    model_step = model_step_fn(trainer, trainer.batches[0])
    for _ in range(args.repeats):  # interleaved, so that a change of load hits (a) and (b) alike
        for w in worker_counts:
            trainer.cfg.workers = w
            loops[w].append(measure_loop(trainer, args.warmup, args.steps))
            print(f"stage {stage} batch {bs} {mode} {precision} workers {w}: loop {loops[w][-1]['pairs_s']:.1f} "
                  f"pairs/s", flush=True)
        models.append(bs / time_repeated(model_step, args.model_steps or args.steps, dev,
                                         warmup=min(args.warmup, 5)))
        print(f"stage {stage} batch {bs} {mode} {precision}: model step {models[-1]:.1f} pairs/s", flush=True)
    model = max(models)
    hard = trainer.cfg.ranking_batches and trainer.cfg.negatives == "hard"
    mine = mining_alone_s(trainer, max(3, args.steps // 4)) if hard else 0.0
    peak = f"{torch.cuda.max_memory_allocated(trainer.device) / 2 ** 30:.1f}" if cuda else "–"
    rows = []
    for w in worker_counts:
        m = max(loops[w], key=lambda r: r["pairs_s"])
        ratio = m["pairs_s"] / model
        rows.append([stage, bs, mode, precision, w, f"{m['pairs_s']:.1f}", f"{model:.1f}", f"{100 * ratio:.0f} %",
                     "yes" if ratio >= 0.9 else "**no**", f"{100 * m['wait']:.1f} %", f"{100 * m['host_step']:.0f} %",
                     f"{100 * m['log_sync']:.1f} %",
                     f"{1000 * mine:.1f} ms = {100 * mine / m['step_s']:.1f} %" if hard else "–", peak])
    return rows


if __name__ == "__main__":
    main()
