"""Benchmark: does the captured step train like the eager one? (BENCHMARKS.md section 10; needs CUDA for the graph.)

From ONE Stage I checkpoint, the Flickr30k Stage II recipe (hard negatives, dropout, fp32 with TF32, channels_last)
is trained for --steps steps three times with the same seed and the same batches: eager, eager again (the baseline:
how much two eager runs differ, cuDNN's algorithm choice and atomics included) and captured (``compile:
cuda_graph``); with --inductor a fourth run, captured with the two CNNs compiled by inductor (an experiment). Each
run uses the Trainer's own loader and step; the loss terms are read back after every step.

Reported: per loss term the largest and the mean absolute difference between the curves (eager vs eager, eager vs
captured); the relative difference of all weights (||a - b|| / ||a|| over every floating tensor, and the largest
per-tensor value) after --weights-at steps and at the end.

    .venv/bin/python bench/graph_parity.py                    # CUDA: 200 steps, weights after 20
    .venv/bin/python bench/graph_parity.py --steps 6 --weights-at 3 --train-images 128 --no-write   # smoke (CPU:
    #   the captured run is then the emulated graph of the tests)
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
from common import (DEFAULT_CACHE, add_output_args, build_trainer, default_image_size, device, inductor,
                    pad_classifier, report, synthetic_prepared, table)

from utils.cli import ArgumentParser  # noqa: E402

HEADING = "## 10. Captured vs eager training step"


def train(config: str, data: Path, run: Path, ckpt1: Path, overrides: dict, steps: int, weights_at: int,
          emulate: bool, compiled: bool = False):
    """(per-step loss terms, weights after ``weights_at`` steps, weights at the end)."""
    import torch

    from engine.step import EmulatedGraph

    trainer = build_trainer(config, 2, data, run, overrides, stage1_ckpt=ckpt1)
    if compiled:
        inductor(trainer)
    if emulate:  # CPU smoke test only: the captured mode's logic without CUDA
        trainer.stepper.mode, trainer.stepper.graph_factory = "cuda_graph", EmulatedGraph
    trainer.model.train()
    curves, early = [], None
    for _ in range(steps):
        if trainer.batch == len(trainer.batches):  # the loop's epoch end: the schedule moves
            trainer.epoch, trainer.batch = trainer.epoch + 1, 0
            trainer.scheduler.step()
        trainer.train_step(trainer._next_batch())
        trainer.batch += 1
        trainer.step += 1
        curves.append(trainer.step_values())
        if trainer.step == weights_at:
            early = {k: v.detach().float().clone() for k, v in trainer.module.state_dict().items()
                     if v.is_floating_point()}
    final = {k: v.detach().float().clone() for k, v in trainer.module.state_dict().items() if v.is_floating_point()}
    trainer._iter = None
    trainer.log.close()
    if trainer.device.type == "cuda":
        torch.cuda.empty_cache()
    return curves, early, final


def weight_diff(a: dict, b: dict) -> tuple[float, float, str]:
    import torch

    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(a[k].pow(2).sum()) for k in a)
    per = {k: float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a}
    worst = max(per, key=per.get)
    assert all(torch.isfinite(a[k]).all() for k in a)
    return (num / den) ** 0.5, per[worst], worst


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--weights-at", type=int, default=20, help="compare the weights after this many steps too")
    ap.add_argument("--config", default="configs/flickr30k_stage{stage}.yaml")
    ap.add_argument("--dropout", type=float, default=None, help="config override (default: the config's); 0 takes "
                    "the random masks out of the comparison (inductor draws its own)")
    ap.add_argument("--inductor", action="store_true", help="also captured with the two CNNs compiled by inductor "
                    "(bench/common.py inductor(), the experiment of train_throughput.py --compile inductor)")
    ap.add_argument("--train-images", type=int, default=4096, help="synthetic training images = classes")
    ap.add_argument("--classifier-classes", type=int, default=29783, help="rows of the shared W (Flickr30k's)")
    ap.add_argument("--image-size", type=int, default=None, help="synthetic prepared size (default from the crop)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="synthetic data cache (default %(default)s)")
    add_output_args(ap)
    args = ap.parse_args()
    if not 1 <= args.weights_at <= args.steps:
        ap.error("--weights-at must be between 1 and --steps")
    import torch  # after parsing

    from engine.config import load_config

    cuda = torch.cuda.is_available()
    base = load_config(common.config_path(args.config, 2), {}, stage=2)
    data = synthetic_prepared(args.train_images, args.image_size or default_image_size(base.train_crop), args.cache)
    overrides = {"pretrained": "none", "workers": base.workers if cuda else 0}
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_parity_") as tmp, pad_classifier(args.classifier_classes):
        t1 = build_trainer(args.config, 1, data, Path(tmp) / "s1", {**overrides, "compile": "off"})
        t1.save()
        t1.log.close()
        ckpt1 = Path(tmp) / "s1" / "checkpoint_last.pt"
        del t1
        modes = [("eager", "off"), ("eager again", "off"), ("captured", "cuda_graph")]
        for name, mode in modes + ([("captured + inductor", "inductor")] if args.inductor else []):
            runs[name] = train(args.config, data, Path(tmp) / name.replace(" ", "_"), ckpt1,
                               {**overrides, "compile": mode.replace("inductor", "cuda_graph") if cuda else "off"},
                               args.steps, args.weights_at, emulate=mode != "off" and not cuda,
                               compiled=mode == "inductor")
            print(f"{name}: last loss/total {runs[name][0][-1]['loss/total']:.4f}", flush=True)
    ref = runs["eager"]
    rows = []
    for name in list(runs)[1:]:
        curves, early, final = runs[name]
        for k in ref[0][0]:
            d = [abs(a[k] - b[k]) for a, b in zip(ref[0], curves)]
            rows.append([f"eager vs {name}", k, f"{max(d):.3g}", f"{sum(d) / len(d):.3g}",
                         f"{min(a[k] for a in ref[0]):.4g} .. {max(a[k] for a in ref[0]):.4g}"])
        for at, a, b in ((args.weights_at, ref[1], early), (args.steps, ref[2], final)):
            rel, worst, key = weight_diff(a, b)
            rows.append([f"eager vs {name}", f"weights after {at} steps", f"{rel:.3g}", f"max {worst:.3g} ({key})",
                         "–"])
    lines = table(["runs", "loss term / weights", "largest |difference| / relative L2", "mean |difference|",
                   "eager curve range"], rows, "llrrr")
    title = (f"{Path(args.config.format(stage=2)).name} from one Stage I checkpoint, {args.steps} steps, "
             f"{'CUDA' if cuda else 'CPU (captured = emulated graph)'}")
    notes = [f"Data: {data} (synthetic, {args.train_images} classes; the shared W padded to "
             f"{args.classifier_classes} rows); pretrained none; precision {base.precision}; dropout "
             f"{overrides.get('dropout', base.dropout)}; "
             f"seed {base.seed}. Each run starts from the same Stage I checkpoint and sees the same batches."]
    report(args, HEADING, title, notes, lines)


if __name__ == "__main__":
    main()
