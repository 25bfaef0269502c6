"""Benchmark: a candidate layout for the text CNN (BENCHMARKS.md section 13). ``models/text_cnn.py`` runs
``nn.Conv1d`` over (N, C, L) activations (``layout ncl``). The candidate (``layout nlc``, ``rows_features`` below,
the same parameters) keeps them as (N, L, C) rows, as the word embedding produces them, and runs every convolution as
one matrix product over the N x L rows (the 1x2 convolution over each position's pair of inputs) and every BatchNorm
over those rows: no transposes. Which is faster depends on the device's convolution and matrix-product kernels, so
this times both where training runs:

* train: forward + backward of the text path at the training batch (BatchNorm on batch statistics, dropout off),
  the gradient of a fixed random projection of the feature;
* mining: the eval-mode forward of the hard-negative candidates (256 captions in the paper's Stage II);

and reports the largest relative difference between the two layouts' features (rounding only:
``tests/test_text_cnn.py`` checks in float64 that they are the same function, gradients included).

Tried in the model on 2026-12-05 and reverted: faster on the 2-core CPU, but its different rounding sent one demo
seed of five below the demo's promise (docs/training.md, docs/demo.md). Worth adopting only if a GPU says it is
much faster, together with a demo that takes off on every seed whatever the rounding.

    .venv/bin/python bench/text_layout.py                          # CUDA: width 1.0; CPU: the demo's 0.25 and 1.0
    .venv/bin/python bench/text_layout.py --width 1.0 --batch 32 --candidates 256 --repeats 20
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import common  # noqa: F401  (puts the repository root on sys.path)
from common import add_output_args, device, report, table, time_repeated

from utils.cli import ArgumentParser  # noqa: E402

if TYPE_CHECKING:
    import torch

    from models import TextCNN

HEADING = "## 13. Text CNN layout: (N, C, L) convolutions vs (N, L, C) matrix products"


def rows_features(model: TextCNN, tokens: torch.Tensor) -> torch.Tensor:
    """The text CNN on (N, L, C) rows with the model's parameters: each 1x1 convolution multiplies the rows by its
    (Cout, Cin) kernel, the 1x2 convolution (left zero-padding, stride s) each position's pair of inputs by its
    (Cout, 2 Cin) kernel, each BatchNorm normalises the N x L rows. Returns the feature before the head's BatchNorm,
    (N, 2048). BatchNorm as the model's modules do it: batch statistics in training mode (the running ones updated
    in place), the running ones in eval mode."""
    import torch
    import torch.nn.functional as F

    def bn(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:  # (N, L, C): per channel over the N x L rows
        rows = F.batch_norm(x.reshape(-1, x.shape[-1]), m.running_mean, m.running_var, m.weight, m.bias,
                            model.training, m.momentum, m.eps)
        return rows.view(x.shape)

    def pointwise(conv: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:  # stride s keeps positions 0, s, ...
        s = conv.stride[0]
        return F.linear(x[:, ::s] if s > 1 else x, conv.weight[:, :, 0])

    def left_pad_pair(conv: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:  # output o sees s*o - 1 and s*o
        n, _, c = x.shape
        pairs = F.pad(x, (0, 0, 1, 0)).unfold(1, 2, conv.stride[0])  # (N, L/s, C, 2), in the kernel's (Cin, 2) order
        return F.linear(pairs.reshape(n, -1, 2 * c), conv.weight.reshape(conv.out_channels, 2 * c))

    x = bn(model.embed_bn, model.embed(tokens) + model.embed_bias)  # (N, L, 300)
    for blk in model.blocks:
        b = blk.branch
        y = F.relu(bn(b[1], pointwise(b[0], x)))
        y = F.relu(bn(b[4], left_pad_pair(b[3].conv, y)))
        y = bn(b[7], pointwise(b[6], y))
        short = x if isinstance(blk.shortcut, torch.nn.Identity) else bn(blk.shortcut[1], pointwise(blk.shortcut[0], x))
        x = F.relu(y + short)  # (N, L / stride, C)
    return model.fc(x.amax(dim=1) if model.pool == "max" else x.mean(dim=1))  # (N, 2048)


def model_features(model: TextCNN, tokens: torch.Tensor) -> torch.Tensor:
    """The same quantity from the model as it is (layout ncl): the input of the head's BatchNorm."""
    got: list[torch.Tensor] = []
    handle = model.fc.register_forward_hook(lambda m, i, o: got.append(o))
    try:
        model(tokens)
    finally:
        handle.remove()
    return got[0]


def measure(width: float, batch: int, candidates: int, max_len: int, repeats: int, dev: torch.device) -> list[list]:
    import torch

    from models import TextCNN

    torch.manual_seed(0)
    model = TextCNN(20000, max_len=max_len, dropout=0.0, width=width).to(dev)
    train_tokens = torch.randint(1, 20001, (batch, max_len), device=dev)
    pool_tokens = torch.randint(1, 20001, (candidates, max_len), device=dev)
    proj = torch.randn(batch, model.fc.out_features, device=dev)
    layouts = {"ncl": lambda t: model_features(model, t), "nlc": lambda t: rows_features(model, t)}

    def train_step(fn):
        def run() -> None:
            model.zero_grad(set_to_none=True)
            (fn(train_tokens) * proj).sum().backward()
        return run

    def mining(fn):
        def run() -> None:
            with torch.no_grad():
                fn(pool_tokens)
        return run

    rows, times = [], {}
    for name, fn in layouts.items():
        model.train()
        t_train = time_repeated(train_step(fn), repeats, dev, warmup=3)
        model.eval()
        t_mine = time_repeated(mining(fn), repeats, dev, warmup=3)
        times[name] = (t_train, t_mine)
    with torch.no_grad():
        model.eval()
        a, b = layouts["nlc"](pool_tokens), layouts["ncl"](pool_tokens)
        diff = float((a - b).norm() / b.norm())
    for name, (t_train, t_mine) in times.items():
        base_train, base_mine = times["ncl"]
        rows.append([width, batch, candidates, name, f"{1000 * t_train:.2f}", f"{base_train / t_train:.2f}x",
                     f"{1000 * t_mine:.2f}", f"{base_mine / t_mine:.2f}x", f"{diff:.1e}" if name == "nlc" else "–"])
    return rows


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, nargs="+", default=None,
                    help="text CNN widths (default: 1.0 on CUDA, the paper's; 0.25 (the demo's) and 1.0 on CPU)")
    ap.add_argument("--batch", type=int, default=32, help="training batch (default %(default)s, the paper's)")
    ap.add_argument("--candidates", type=int, default=256, help="mining pool (default %(default)s, the paper's)")
    ap.add_argument("--max-len", type=int, default=32, help="sentence length (default %(default)s, Flickr30k's)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls (default 20 on CUDA, 3 on CPU)")
    add_output_args(ap)
    args = ap.parse_args()
    import torch  # after parsing: --help answers at once (docs/cli.md)

    from engine.encode import allow_tf32

    dev = device()
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the Trainer sets it
    allow_tf32(dev, "fp32")  # the fp32 recipes' TF32 matmuls and convolutions (CUDA only)
    widths = args.width or ([1.0] if cuda else [0.25, 1.0])
    repeats = args.repeats or (20 if cuda else 3)
    rows = []
    for width in widths:
        rows += measure(width, args.batch, args.candidates, args.max_len, repeats, dev)
        print(rows[-2], rows[-1], sep="\n", flush=True)
    lines = table(["width", "batch", "candidates", "layout", "train fwd+bwd ms", "vs ncl", "mining fwd ms", "vs ncl",
                   "feature rel. diff"], rows, "rrrlrrrrr")
    notes = [f"Text CNN res50, max_len {args.max_len}, vocabulary 20,000, dropout off, fp32"
             f"{' with TF32, cuDNN benchmark' if cuda else ''}; means over {repeats} calls after 3 "
             f"warm-up calls. ncl = models/text_cnn.py as it is (nn.Conv1d over (N, C, L)); nlc = the candidate, "
             f"the same parameters as matrix products over (N, L, C) rows (rows_features)."]
    title = f"text CNN, (N, C, L) convolutions (the model) vs (N, L, C) products (candidate), {dev.type}"
    report(args, HEADING, title, notes, lines)


if __name__ == "__main__":
    main()
