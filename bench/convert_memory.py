"""Benchmark: peak memory and time of the MatConvNet converter on a full-size network (BENCHMARKS.md section 9; the
figures docs/matconvnet.md quotes under "Memory").

A synthetic Flickr30k Stage II network at the real sizes (Caffe ResNet-50, image head and text CNN at full width,
feature 2048, 20,074 words, 29,783 classes: 129.4 M parameters, random weights) is written the way MatConvNet
writes it (``tests/matconvnet_fixtures.py``), once as a compressed v5 file (MATLAB's default ``-v7``) and once as a
v7.3 (HDF5) file, with a 20,074-word ``flickr30k_dictionary.mat``. Each is then converted by

    python -m matconvnet model FILE --dictionary DICT --out CKPT

in a fresh process, which reports its own peak resident memory (``VmHWM`` of /proc/self/status: Python, torch and
the conversion); the wall time is that process's. Files go to a temporary directory (about 1.5 GB at full size),
removed at the end; the generating process itself peaks at about 2.5 GB.

    .venv/bin/python bench/convert_memory.py                                  # full size: ~2 min on 2 cores
    .venv/bin/python bench/convert_memory.py --small --no-write               # 1/8 widths, seconds: a smoke test
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)

from common import ROOT, add_output_args, report, table
from utils.cli import ArgumentParser

HEADING = "## 9. MatConvNet converter: memory"
MB = 2 ** 20
FULL = dict(width=1.0, text_width=1.0, dim=2048, vocab=20074, classes=29783)
SMALL = dict(width=1 / 8, text_width=1 / 8, dim=32, vocab=12, classes=7)
# VmHWM, the peak resident set of this process's own memory since exec; ru_maxrss would also count the parent's
# resident set at the fork (Linux keeps the larger of the two across execve), here the generated network's arrays.
CHILD = ("import json, re, sys, time\n"
         "from matconvnet.__main__ import main\n"
         "t = time.perf_counter()\n"
         "rc = main(['model', sys.argv[1], '--dictionary', sys.argv[2], '--out', sys.argv[3]])\n"
         "seconds = time.perf_counter() - t\n"
         "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
         "print(json.dumps({'rc': rc, 'seconds': seconds, 'peak_kb': int(hwm)}))")


def write_files(folder: Path, sizes: dict) -> tuple[dict[str, Path], int, int]:
    """(the two network files and the dictionary, number of parameters, their float32 bytes)."""
    import numpy as np

    from tests import matconvnet_fixtures as fx

    nb = fx.dual_path_net("flickr30k", seed=0, **sizes)
    mean = np.array([[[121.5, 113.25, 101.0]]])
    n_params = sum(int(v.size) for v in nb.params.values())
    n_bytes = sum(int(v.nbytes) for v in nb.params.values())
    files = {"v5 (compressed, -v7)": fx.save_v5(folder / "net-epoch-60.mat", {"net": fx.net_struct(nb, mean)}),
             "v7.3 (HDF5)": fx.save_v73(folder / "net-epoch-60-v73.mat", {"net": fx.net_struct(nb, mean)}),
             "dictionary": fx.save_v5(folder / "flickr30k_dictionary.mat", {"subset": fx.dictionary_struct(
                 [f"w{i}" for i in range(sizes["vocab"])], net=nb)})}
    return files, n_params, n_bytes


def convert(path: Path, dictionary: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(dictionary), str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {path} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"converting {path}: exit {result['rc']}: {proc.stderr[-2000:]}")
    return result


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="1/8 widths and a tiny vocabulary (a smoke test)")
    add_output_args(ap)
    args = ap.parse_args()
    sizes = SMALL if args.small else FULL
    with tempfile.TemporaryDirectory(prefix="convert_memory_") as tmp:
        t0 = time.perf_counter()
        files, n_params, n_bytes = write_files(Path(tmp), sizes)
        print(f"wrote the synthetic files in {time.perf_counter() - t0:.0f} s: {n_params:,} parameters", flush=True)
        rows = []
        for kind in ("v5 (compressed, -v7)", "v7.3 (HDF5)"):
            path = files[kind]
            r = convert(path, files["dictionary"], Path(tmp) / "out.pt")
            size = path.stat().st_size
            peak = r["peak_kb"] * 1024
            rows.append([kind, f"{size / MB:.0f}", f"{peak / MB:.0f}", f"{peak / size:.2f}", f"{peak / n_bytes:.2f}",
                         f"{r['seconds']:.1f}"])
            print(f"  {kind}: file {size / MB:.0f} MB, peak RSS {peak / MB:.0f} MB, {r['seconds']:.1f} s", flush=True)
            (Path(tmp) / "out.pt").unlink()
    what = ("full size" if not args.small else "1/8 widths (smoke test)") + (
        f": {n_params / 1e6:.1f} M parameters ({n_bytes / MB:.0f} MB in float32), vocabulary {sizes['vocab']:,}, "
        f"{sizes['classes']:,} classes")
    notes = [f"Synthetic Flickr30k Stage II network, {what} (MB = 2^20 bytes). Peak = VmHWM of the converting "
             f"process (Python and torch included); time = that process's after parsing: importing torch, reading, "
             f"checking, converting, writing the checkpoint."]
    lines = table(["file", "size MB", "peak RSS MB", "peak / file", "peak / float32 params", "seconds"], rows)
    report(args, HEADING, "python -m matconvnet model on a synthetic full-size network" if not args.small
           else "python -m matconvnet model, smoke test", notes, lines)


if __name__ == "__main__":
    main()
