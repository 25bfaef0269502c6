"""Benchmark: command lines that answer at once (issue 13, docs/cli.md).

(a) ``--help`` of every entry point (every ``*.py`` of the repository root, ``prepare/``, ``matconvnet/``,
    ``engine/``, ``retrieval/`` and ``bench/`` with an ``if __name__ == "__main__":`` block), as a whole process: wall and CPU
    seconds (user + system; less sensitive to other processes on a shared machine), each the best of R, and whether the
    process imported torch, torchvision or the models (``python -X importtime``). References: ``python -c pass`` and
    ``python -c "import torch"``.
(b) ``evaluate.py --embeddings`` on COCO-5K-sized features (5,000 x 2048 images, 25,000 x 2048 texts, float32) as a
    whole process vs the bare baseline process: import torch, load the same npz, one similarity matmul
    ``images @ texts.T``. Target: <= 1.5x. Runs interleaved, best of R.

    .venv/bin/python bench/cli_speed.py [--repeats 3] [--no-write]
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
import numpy as np

from common import ROOT, add_output_args, report, table
from utils.cli import ArgumentParser
from utils.files import atomic_write

HEADING = "## 7. Command lines: --help and evaluate.py --embeddings"
HEAVY = ("torch", "torchvision", "models")  # top-level packages no --help may import
BASELINE = ("import sys, numpy as np, torch; z = np.load(sys.argv[1]); "
            "s = torch.from_numpy(z['images']) @ torch.from_numpy(z['texts']).T")


PACKAGES = ("prepare", "matconvnet", "engine", "retrieval")  # entry points run as ``python -m PACKAGE[.MODULE]``


def entry_points(root: Path = ROOT) -> list[list[str]]:
    """The command (after ``python``) of every entry point: scripts as paths, package modules with ``-m`` (a
    package's ``__main__.py`` as ``-m PACKAGE``)."""
    out = []
    for folder in ("", *PACKAGES, "bench"):
        for path in sorted((root / folder).glob("*.py")):
            if 'if __name__ == "__main__":' not in path.read_text(encoding="utf-8"):
                continue
            rel = path.relative_to(root).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__main__" else rel.parts
            out.append(["-m", ".".join(parts)] if folder in PACKAGES else [str(path.relative_to(root))])
    return out


def heavy_imports(importtime_stderr: str) -> list[str]:
    """Top-level packages of HEAVY named in the ``-X importtime`` report of a process."""
    found = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            top = line.rsplit("|", 1)[1].strip().split(".")[0]
            if top in HEAVY:
                found.add(top)
    return sorted(found)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_timed(cmd: list[str], check: bool = True) -> tuple[tuple[float, float], subprocess.CompletedProcess]:
    """((wall seconds, CPU seconds of the process), the process)."""
    t0, c0 = time.perf_counter(), children_cpu()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    dt = (time.perf_counter() - t0, children_cpu() - c0)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return dt, proc


def best_of(cmd: list[str], repeats: int) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds) over ``repeats`` runs."""
    times = [run_timed(cmd)[0] for _ in range(repeats)]
    return min(t[0] for t in times), min(t[1] for t in times)


def coco5k_npz(path: Path, seed: int = 0) -> Path:
    """5,000 x 2048 image and 25,000 x 2048 text features (float32), 5 captions per image, written once."""
    if not path.is_file():
        rng = np.random.default_rng(seed)
        images = rng.standard_normal((5000, 2048), dtype=np.float32)
        owner = np.repeat(np.arange(5000), 5)
        texts = images[owner] + 2.0 * rng.standard_normal((25000, 2048), dtype=np.float32)
        with atomic_write(path) as f:
            np.savez(f, images=images, texts=texts, image_labels=np.arange(5000), text_labels=owner)
    return path


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="best of R for every process (default %(default)s)")
    ap.add_argument("--skip-embeddings", action="store_true", help="only (a)")
    add_output_args(ap)
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    py = sys.executable

    rows = []
    refs = [("`python -c pass`", [py, "-c", "pass"]), ("`python -c 'import torch'`", [py, "-c", "import torch"])]
    for label, cmd in refs:
        wall, cpu = best_of(cmd, args.repeats)
        rows.append([label, f"{wall:.2f}", f"{cpu:.2f}", "(reference)"])
    slowest = (0.0, 0.0)
    for ep in entry_points():
        wall, cpu = best_of([py, *ep, "--help"], args.repeats)
        heavy = heavy_imports(run_timed([py, "-X", "importtime", *ep, "--help"])[1].stderr)
        slowest = (max(slowest[0], wall), max(slowest[1], cpu))
        rows.append([f"`python {' '.join(ep)} --help`", f"{wall:.2f}", f"{cpu:.2f}", ", ".join(heavy) or "none"])
        print(f"  {' '.join(ep)} --help: {wall:.2f} s wall, {cpu:.2f} s CPU, heavy imports: {heavy or 'none'}",
              flush=True)
    lines = table(["process", "wall s", "CPU s", "imports torch / torchvision / models"], rows)
    notes = [f"(a) --help as a whole process, best of {args.repeats}; slowest entry point {slowest[0]:.2f} s wall, "
             f"{slowest[1]:.2f} s CPU."]

    if not args.skip_embeddings:
        with tempfile.TemporaryDirectory(prefix="cli_speed_") as tmp:
            npz = coco5k_npz(Path(tmp) / "coco5k.npz")
            t_base, t_eval, heavy = [], [], []
            for _ in range(args.repeats):  # interleaved, so that load changes hit both alike
                t_base.append(run_timed([py, "-c", BASELINE, str(npz)])[0])
                t_eval.append(run_timed([py, "evaluate.py", "--embeddings", str(npz)])[0])
                print(f"  baseline {t_base[-1][0]:.2f} s wall / {t_base[-1][1]:.2f} s CPU, evaluate.py --embeddings "
                      f"{t_eval[-1][0]:.2f} s / {t_eval[-1][1]:.2f} s", flush=True)
            heavy = heavy_imports(run_timed([py, "-X", "importtime", "evaluate.py", "--embeddings", str(npz)])[1]
                                  .stderr)
        base = (min(t[0] for t in t_base), min(t[1] for t in t_base))
        ev = (min(t[0] for t in t_eval), min(t[1] for t in t_eval))
        ratio = (ev[0] / base[0], ev[1] / base[1])
        lines += ["", *table(["process (5,000 x 25,000, d 2048, float32)", "wall s", "x baseline (wall)", "CPU s",
                              "x baseline (CPU)"], [
            ["baseline: import torch, np.load, one `images @ texts.T`", f"{base[0]:.2f}", "1.00", f"{base[1]:.2f}",
             "1.00"],
            ["`python evaluate.py --embeddings coco5k.npz` (both directions, R@K, medr, meanr)", f"{ev[0]:.2f}",
             f"{ratio[0]:.2f}", f"{ev[1]:.2f}", f"{ratio[1]:.2f}"]])]
        notes.append(f"(b) evaluate.py --embeddings / baseline, best of {args.repeats} interleaved: {ratio[0]:.2f} "
                     f"wall, {ratio[1]:.2f} CPU (target <= 1.5: {'met' if max(ratio) <= 1.5 else 'NOT met'}); "
                     f"its heavy imports: {', '.join(heavy) or 'none'} (torch is expected).")
    report(args, HEADING, "command lines: --help of every entry point, evaluate.py --embeddings", notes, lines)


if __name__ == "__main__":
    main()
