"""Benchmark: peak memory of one Stage II training step with the paper model (BENCHMARKS.md section 5).

Paper model: ResNet-50 (random init), 224 crops, feature 2048, text CNN at full width (res50 stages), max_len 32,
shared W for Flickr30k (29,783 classes, vocab 20,074, W bias) and MSCOCO (113,287 classes, vocab 29,972, no bias).
The step is Trainer.train_step's: uint8 -> image.normalize on the device (channels_last on CUDA), hard-negative
mining over --candidates captions (eval mode, no grad), forward (bf16 autocast on CUDA, fp32 on CPU), total_loss with
the Stage II lambdas, backward, SGD (momentum 0.9, Nesterov, the paper's parameter groups). --steps steps are run (the
momentum buffers exist from the first optimizer step on, so the second step is the steady-state peak).

Each configuration runs in a fresh subprocess, so peaks do not mix:
* CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (model, optimizer and inputs already resident
  are included; "before step" is what was allocated just before the first step), plus max_memory_reserved;
* CPU: peak RSS (ru_maxrss) and its increase over the RSS just before the first step.
Also printed: the size of W, its gradient and its SGD momentum buffer (3 x N x 2048 x 4 bytes in fp32).

    .venv/bin/python bench/memory.py                                      # batch 32 (CPU: ~1 min per config)
    .venv/bin/python bench/memory.py --batch-size 2 --candidates 8 --steps 1 --no-write   # smoke test
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import common  # noqa: F401  (puts the repository root on sys.path)

from common import add_output_args, device, report, table
from utils.cli import ArgumentParser

if TYPE_CHECKING:
    import torch

HEADING = "## 5. Memory"
CONFIGS = {"flickr30k": dict(classes=29783, vocab=20074, bias=True),
           "coco": dict(classes=113287, vocab=29972, bias=False)}
MB = 2 ** 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(args: argparse.Namespace) -> dict:
    from engine.encode import autocast
    import torch

    from models import build_model, hardest_negatives, param_groups, total_loss

    c = CONFIGS[args.child]
    dev = device()
    torch.manual_seed(0)
    model = build_model(num_classes=c["classes"], vocab_size=c["vocab"], max_len=args.max_len, word2vec=None,
                        arch="resnet50", pretrained="none", dropout=0.75, classifier_bias=c["bias"],
                        text_pool="max", text_depth="res50", image_pool=7, feature_dim=2048, text_width=1.0).to(dev)
    channels_last = dev.type == "cuda"
    if channels_last:
        model.image.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(param_groups(model, 2, 0.1, 1e-4), lr=0.1, momentum=0.9, nesterov=True)
    b, h, L = args.batch_size, args.batch_size // 2, args.max_len
    g = torch.Generator().manual_seed(0)
    images_u8 = torch.randint(0, 256, (b, 3, 224, 224), dtype=torch.uint8, generator=g).to(dev)
    lengths = torch.randint(8, L + 1, (b + args.candidates,), generator=g)
    words = torch.randint(1, c["vocab"] + 1, (b + args.candidates, L), generator=g)
    words[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    tokens, cand = words[:b].to(dev), words[b:].to(dev)
    labels = torch.randint(0, c["classes"], (b,), generator=g).to(dev)
    cand_labels = torch.randint(0, c["classes"], (args.candidates,), generator=g).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    if dev.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = rss_bytes()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        images = model.image.normalize(images_u8, channels_last)
        model.eval()
        with torch.no_grad(), autocast(dev, "auto"):
            idx = hardest_negatives(model.image(images[:h])["rank"], model.text(cand)["rank"])
        model.train()
        tok, tlab = tokens.clone(), labels.clone()
        tok[h:], tlab[h:] = cand[idx], cand_labels[idx]
        with autocast(dev, "auto"):
            out = model(images, tok)
        loss, _ = total_loss(out, labels, tlab, lambda_rank=2.0, lambda_img=1.0, lambda_txt=0.1, margin=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    res = {"params": n_params, "before": before, "step_s": times[-1]}
    if dev.type == "cuda":
        res.update(peak=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved(),
                   after=torch.cuda.memory_allocated())
    else:
        res.update(peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, after=rss_bytes())
    return res


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--batch-size", type=int, default=32, help="even; default %(default)s (the paper's)")
    ap.add_argument("--candidates", type=int, default=256, help="hard-negative candidates (default %(default)s)")
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="steps per configuration (default %(default)s)")
    ap.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    add_output_args(ap)
    args = ap.parse_args()
    if args.batch_size < 2 or args.batch_size % 2:
        ap.error("--batch-size must be even and >= 2")
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    dev = device()
    rows = []
    for name in args.configs:
        cmd = [sys.executable, __file__, "--child", name, "--batch-size", str(args.batch_size), "--candidates",
               str(args.candidates), "--max-len", str(args.max_len), "--steps", str(args.steps)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name}: child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
        n = CONFIGS[name]["classes"]
        w = n * 2048 * 4
        rows.append([name, f"{n:,}", f"{CONFIGS[name]['vocab']:,}", f"{w / MB:.0f}", f"{3 * w / MB:.0f}",
                     f"{r['params'] / 1e6:.1f} M = {r['params'] * 4 / MB:.0f}", f"{r['before'] / MB:.0f}",
                     f"{r['peak'] / MB:.0f}", f"{(r['peak'] - r['before']) / MB:.0f}",
                     f"{r['reserved'] / MB:.0f}" if "reserved" in r else "–", f"{r['step_s']:.1f}"])
        print(f"{name}: peak {r['peak'] / MB:.0f} MB (before the step {r['before'] / MB:.0f} MB), "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    cuda = dev.type == "cuda"
    what = ("torch.cuda.max_memory_allocated (bf16 autocast, channels_last)" if cuda
            else "peak RSS of the process (ru_maxrss), fp32")
    title = (f"one Stage II step (mining included), batch {args.batch_size}, {args.candidates} candidates, ResNet-50 "
             f"224 + full text CNN, feature 2048, {dev.type}")
    notes = [f"Peak = {what}; 'before' = {'allocated' if cuda else 'RSS'} just before the first step (model, "
             f"optimizer, inputs); 'step' = peak - before. Max over {args.steps} step(s), each in a fresh process.",
             "W = the shared classifier's N x 2048 fp32 weight; W + grad + momentum = 3 x N x 2048 x 4 bytes (the "
             "bias is negligible). Under bf16 autocast the forward also holds a bf16 copy of W (N x 2048 x 2 bytes)."]
    lines = table(["config", "classes N", "vocab", "W MB", "W + grad + momentum MB", "params (fp32 MB)",
                   "before MB", "peak MB", "step MB", "reserved MB", "s/step"], rows)
    report(args, HEADING, title, notes, lines)


if __name__ == "__main__":
    main()
