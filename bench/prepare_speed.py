"""Benchmark: image resizing during preparation (BENCHMARKS.md section 3), with the real
``prepare.images.resize_many`` (decode, shorter side -> --size bicubic, JPEG quality 95 written to disk).

Two generated image sets, JPEG quality 90, "natural-ish" content (smooth multi-scale noise plus fine grain, so the
files have photo-like entropy: a 500x375 image is ~100 KB, as Flickr30k's average ~140 KB; 2000x1500 ~1 MB):
(a) Flickr-like 500x375 originals; (b) large 2000x1500 originals (phone/camera-sized, like some COCO sources).
Each set is resized serially and with process pools of 2 and N workers (pool start-up included), with and
without JPEG draft mode (``draft=``: DCT-domain downscaling of large JPEGs; it cannot apply to 500x375 at S=256).
Goal: >= 1.8x with 2 workers on 2 cores. Reported: images/s, speed-up over the serial run with the same draft
setting, and CPU seconds (this process + the pool's processes; compare with wall x workers to see whether other
load on the machine took the cores).

resize_many sends jobs to the pool in tasks of 16 images, so use a multiple of 16 x workers images per set
(the defaults scale with the largest worker count) or the last tasks leave workers idle.

    .venv/bin/python bench/prepare_speed.py
    .venv/bin/python bench/prepare_speed.py --medium 32 --large 32 --workers 1 2 --no-write   # smoke test
"""
from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np
from PIL import Image

from common import add_output_args, report, table, usable_cores
from utils.cli import ArgumentParser

HEADING = "## 3. Preparation: image resizing"


def natural_image(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Smooth noise at several scales (like shading and objects) + fine grain (texture, sensor noise)."""
    acc = np.zeros((h, w, 3), dtype=np.float32)
    for cells, amp in ((4, 60.0), (16, 40.0), (64, 30.0), (250, 25.0)):
        small = rng.normal(0.0, 1.0, size=(max(2, cells * h // w), cells, 3)).astype(np.float32)
        for c in range(3):
            band = Image.fromarray(small[:, :, c], mode="F").resize((w, h), Image.Resampling.BICUBIC)
            acc[:, :, c] += amp * np.asarray(band)
    acc += rng.normal(0.0, 10.0, size=(h, w, 3)).astype(np.float32) + 128.0
    return Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8), "RGB")


def make_set(folder: Path, n: int, w: int, h: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{i:06d}.jpg"
        if i < 16:
            natural_image(w, h, rng).save(p, "JPEG", quality=90)
        else:  # 16 distinct images, then copies (generation is slow; decoding cost is the same)
            shutil.copyfile(paths[i % 16], p)
        paths.append(p)
    return paths


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed_resize(srcs: list[Path], out: Path, size: int, workers: int, draft: bool) -> tuple[float, float]:
    from prepare.images import resize_many

    shutil.rmtree(out, ignore_errors=True)
    jobs = [(s, out / s.name) for s in srcs]
    c0, t0 = cpu_seconds(), time.perf_counter()
    resize_many(jobs, size, "short_side", workers=workers, draft=draft)
    return time.perf_counter() - t0, cpu_seconds() - c0


def main() -> None:
    cores = usable_cores()
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--medium", type=int, default=None, help="500x375 images (default max(320, 64 x max workers))")
    ap.add_argument("--large", type=int, default=None, help="2000x1500 images (default max(64, 32 x max workers))")
    ap.add_argument("--size", type=int, default=256, help="target shorter side (default %(default)s, the paper's)")
    ap.add_argument("--workers", type=int, nargs="+", default=sorted({1, 2, cores}),
                    help="1 = serial (always added); default %(default)s")
    ap.add_argument("--repeats", type=int, default=1, help="best of R per cell (default %(default)s)")
    add_output_args(ap)
    args = ap.parse_args()
    workers = sorted(set(args.workers) | {1})
    args.medium = max(320, 64 * workers[-1]) if args.medium is None else args.medium  # 16-image tasks: >= 2 per
    args.large = max(64, 32 * workers[-1]) if args.large is None else args.large  # worker, whole rounds
    sets = [("(a) 500x375", args.medium, 500, 375), ("(b) 2000x1500", args.large, 2000, 1500)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        for k, (name, n, w, h) in enumerate(sets):
            if n <= 0:
                continue
            if n <= 16:
                print(f"note: {name}: {n} images <= 16 run serially in resize_many whatever the worker count")
            t0 = time.perf_counter()
            srcs = make_set(Path(tmp) / f"src{k}", n, w, h, seed=k)
            kb = sum(p.stat().st_size for p in srcs) / len(srcs) / 1024
            print(f"{name}: {n} JPEGs, {kb:.0f} KB each on average, generated in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            for draft in (False, True):
                serial = None
                for nw in workers:
                    best = min((timed_resize(srcs, Path(tmp) / "out", args.size, nw, draft)
                                for _ in range(args.repeats)), key=lambda r: r[0])
                    wall, cpu = best
                    serial = serial or wall
                    speedup = serial / wall
                    goal = ("yes" if speedup >= 1.8 else "**no**") if nw == 2 else ""
                    rows.append([f"{name}, {kb:.0f} KB", "on" if draft else "off", nw, n, f"{n / wall:.1f}",
                                 f"{speedup:.2f}", goal, f"{wall:.2f}", f"{cpu:.2f}"])
                    print(f"  draft {'on ' if draft else 'off'} workers {nw}: {n / wall:.1f} images/s "
                          f"(x{speedup:.2f}), CPU {cpu:.1f} s", flush=True)
    title = f"resize_many to shorter side {args.size}, JPEG q95 out, workers {', '.join(map(str, workers))}"
    notes = ["Inputs generated: smooth multi-scale noise + grain, JPEG quality 90 (16 distinct images per set, "
             "repeated). Pool start-up included. CPU s = this process + pool processes (user + system).",
             "Goal: >= 1.8x with 2 workers on 2 cores (column '2 w >= 1.8x')."]
    lines = table(["image set", "draft", "workers", "images", "images/s", "x serial", "2 w >= 1.8x", "wall s",
                   "CPU s"], rows, "llrrrrrrr")
    report(args, HEADING, title, notes, lines)


if __name__ == "__main__":
    main()
