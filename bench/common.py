"""Helpers shared by the bench/ scripts: machine description, markdown tables appended to BENCHMARKS.md, timing, the
synthetic prepared dataset they train on, and Trainer construction (Stage II from a Stage I checkpoint).

Importing this module puts the repository root on sys.path (the scripts run as ``python bench/x.py``). It imports
torch only inside the functions that use it: every bench script parses its arguments first (docs/cli.md).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    import torch

BENCHMARKS = ROOT / "BENCHMARKS.md"
DEFAULT_CACHE = ROOT / "runs" / "bench_data"  # runs/ is git-ignored


# ------------------------------------------------------------------------------------------------ machine, output
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_line() -> str:
    """CPU model, cores, torch version and threads, CUDA/GPU, load average (call it at the end of a run)."""
    import torch

    gpu = "no GPU"
    if torch.cuda.is_available():
        gpu = (f"GPU {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, cuDNN "
               f"{torch.backends.cudnn.version()}, {torch.cuda.device_count()} visible)")
    return (f"Machine: {cpu_model()}, {os.cpu_count()} cores ({usable_cores()} usable), torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads, {gpu}; load average at the end {load_average()}.")


def command_line() -> str:
    """The exact command that ran this script, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(ROOT))
    except ValueError:
        script_s = str(script)
    try:
        py_s = str(Path(os.path.abspath(sys.executable)).relative_to(ROOT))
    except ValueError:
        py_s = sys.executable
    return f"cd {ROOT} && {py_s} {shlex.join([script_s, *sys.argv[1:]])}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    """Markdown table lines; ``align`` is one letter per column, l or r (default: first l, the rest r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _number(heading: str) -> float:
    m = re.match(r"## (\d+)\.", heading)
    return float(m.group(1)) if m else float("inf")


def append_to_benchmarks(block: str, path: Path, heading: str) -> None:
    """Append ``block`` at the end of section ``heading``; a missing section is created before the first section
    with a higher number ("## 3." goes before "## 4."), the file with "# Benchmarks" if missing."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if heading not in text:
        later = [m.start() for m in re.finditer(r"^## .*$", text, re.M) if _number(m.group(0)) > _number(heading)]
        if not later:
            path.write_text(text.rstrip("\n") + f"\n\n{heading}\n\n{block}")
            return
        at = later[0]
        path.write_text(text[:at].rstrip("\n") + f"\n\n{heading}\n\n{block}\n" + text[at:])
        return
    start = text.index(heading) + len(heading)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt + 1
    path.write_text(text[:end].rstrip("\n") + f"\n\n{block}" + ("\n" + text[end:] if nxt >= 0 else ""))


FLICKR30K_CLASSES = 29783  # the shared W's rows in the Flickr30k recipes (its training images)


def add_recipe_args(ap: argparse.ArgumentParser) -> None:
    """The training benchmarks' recipe and data (train_throughput.py, step_breakdown.py): the paper's Flickr30k recipe
    on CUDA, the demo on CPU, on the synthetic dataset with the shared W at the real dataset's size.
    ``recipe_defaults`` fills what depends on the device."""
    ap.add_argument("--config", default=None, help="config file; {stage} is replaced by the stage (default "
                    "configs/flickr30k_stage{stage}.yaml on CUDA, configs/demo.yaml on CPU)")
    ap.add_argument("--pretrained", default="none", help="config override (default %(default)s: no weights here)")
    ap.add_argument("--data", type=Path, default=None, help="a prepared directory (default: synthetic, cached)")
    ap.add_argument("--train-images", type=int, default=None,
                    help="synthetic training images = classes (default 4096 on CUDA, 600 on CPU)")
    ap.add_argument("--classifier-classes", type=int, default=None,
                    help=f"rows of the shared W, at least the data's classes (default {FLICKR30K_CLASSES} on CUDA: "
                         "Flickr30k's; the data's on CPU)")
    ap.add_argument("--image-size", type=int, default=None, help="synthetic prepared size (default 256 for 224, 72 for "
                    "64 crops, 144 for 128 crops)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="synthetic data cache (default %(default)s)")


def recipe_defaults(args: argparse.Namespace, cuda: bool) -> None:
    """Fill ``add_recipe_args``'s device-dependent defaults in place (config, training images, W's rows)."""
    args.config = args.config or ("configs/flickr30k_stage{stage}.yaml" if cuda else "configs/demo.yaml")
    args.train_images = args.train_images or (4096 if cuda else 600)
    args.classifier_classes = args.classifier_classes or (FLICKR30K_CLASSES if cuda else 0)


def add_output_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--output", type=Path, default=BENCHMARKS, help="markdown file to append to (default %(default)s)")
    ap.add_argument("--no-write", action="store_true", help="print the table only; do not touch --output")


def report(args: argparse.Namespace, heading: str, title: str, notes: Sequence[str], lines: Sequence[str]) -> str:
    """Print the block (### date - title, machine, command, notes, table lines) and append it unless --no-write."""
    block = "\n".join([f"### {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} — {title}", "",
                       machine_line(), f"Command: `{command_line()}`", *notes, "", *lines, ""])
    print("\n" + block)
    if not args.no_write:
        append_to_benchmarks(block, args.output, heading)
        print(f"appended to {args.output} under '{heading}'")
    return block


# ------------------------------------------------------------------------------------------------ timing
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)


def time_repeated(fn: Callable[[], Any], n: int, dev: torch.device, warmup: int = 1) -> float:
    """Seconds per call of ``fn`` over n calls after ``warmup`` calls (device synchronised around the window)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / max(n, 1)


# ------------------------------------------------------------------------------------------------ data and trainer
def synthetic_prepared(train_images: int, image_size: int, cache: Path = DEFAULT_CACHE, holdout: int = 16) -> Path:
    """A prepared directory of the synthetic dataset with ``train_images`` training images (= classes), resized to
    ``image_size`` by the real Flickr30k preparer; built once and cached under ``cache``."""
    from prepare.flickr30k import main as prepare_flickr30k
    from prepare.synthetic import make_synthetic

    out = Path(cache) / f"synthetic_train{train_images}_s{image_size}"
    if (out / "manifest.json").is_file():
        return out
    raw = Path(cache) / f"synthetic_raw_train{train_images}"
    if not (raw / "dataset_flickr30k.json").is_file():
        t0 = time.perf_counter()
        make_synthetic(raw, images=train_images + 2 * holdout, val=holdout, test=holdout, overwrite=True)
        print(f"[bench] synthetic raw data: {train_images + 2 * holdout} images in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    rc = prepare_flickr30k(["--images", str(raw / "images"), "--captions", str(raw / "results_20130124.token"),
                            "--split-json", str(raw / "dataset_flickr30k.json"), "--word2vec",
                            str(raw / "word2vec.bin"), "--out", str(out), "--image-size", str(image_size),
                            "--workers", str(usable_cores()), "--overwrite"])
    if rc != 0:
        raise RuntimeError(f"preparing {raw} failed (exit {rc})")
    return out


def default_image_size(crop: int) -> int:
    """Prepared short side for a training crop: 256 for 224 (the paper), 72 for 64 (the demo), 144 for 128."""
    return {224: 256, 128: 144, 64: 72}.get(crop, round(crop * 8 / 7))


def config_path(pattern: str, stage: int) -> Path:
    p = Path(pattern.format(stage=stage))
    return p if p.is_absolute() else ROOT / p


def build_trainer(pattern: str, stage: int, data: Path, run_dir: Path, overrides: dict[str, Any],
                  stage1_ckpt: Path | None = None):
    """engine.loop.Trainer for ``stage``; Stage II starts from ``stage1_ckpt`` or, when None, from a checkpoint of a
    freshly built Stage I trainer (written under run_dir/stage1_init)."""
    from engine.config import load_config
    from engine.loop import Trainer

    cfg = load_config(config_path(pattern, stage), overrides, stage=stage)
    if stage == 1:
        return Trainer(cfg, data, run_dir)
    if stage1_ckpt is None:
        t1 = build_trainer(pattern, 1, data, run_dir / "stage1_init", overrides)
        t1.save()
        stage1_ckpt = run_dir / "stage1_init" / "checkpoint_last.pt"
        t1.log.close()
        del t1
    return Trainer(cfg, data, run_dir, init=stage1_ckpt)


def model_step_fn(trainer, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """The model's own step: the Trainer's step (``TrainStep.run``, its mode: eager or the captured graph) on one
    batch already on the device: mining, forward, losses, backward, optimizer step; no loader, no host copies."""
    from engine.step import INPUTS

    on_device = {k: batch[k].to(trainer.device) for k in INPUTS if k in batch}
    trainer.model.train()
    return lambda: trainer.train_step(on_device)


def model_pairs_per_s(trainer, batch: dict[str, torch.Tensor], steps: int, warmup: int) -> float:
    dt = time_repeated(model_step_fn(trainer, batch), steps, trainer.device, warmup)
    return trainer.cfg.batch_size / dt


@contextlib.contextmanager
def pad_classifier(classes: int):
    """Within the block, Trainers build the shared W with at least ``classes`` rows (the real dataset's size, where
    the synthetic data has fewer classes: the labels use the first rows). 0: unchanged."""
    import engine.model_io as model_io

    real = model_io.build_model

    def build_model(*, num_classes: int, **kwargs):
        return real(num_classes=max(num_classes, classes), **kwargs)

    model_io.build_model = build_model
    try:
        yield
    finally:
        model_io.build_model = real
