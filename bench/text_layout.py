"""Benchmark: the text CNN's layout (BENCHMARKS.md section 13). Since 2026-12-05 ``models/text_cnn.py`` keeps the
activations as (N, L, C) rows and runs every convolution as one matrix product (``layout nlc``); before, it ran
``nn.Conv1d`` over (N, C, L) (``layout ncl``, ``conv1d_features`` below, the same parameters). Which is faster
depends on the device's convolution and matrix-product kernels, so this times both where training runs:

* train: forward + backward of the text path at the training batch (BatchNorm on batch statistics, dropout off),
  the gradient of a fixed random projection of the feature;
* mining: the eval-mode forward of the hard-negative candidates (256 captions in the paper's Stage II);

and reports the largest relative difference between the two layouts' features (rounding only:
``tests/test_text_cnn.py`` checks in float64 that they are the same function, gradients included).

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

HEADING = "## 13. Text CNN layout: (N, L, C) matrix products vs (N, C, L) convolutions"


def conv1d_features(model: TextCNN, tokens: torch.Tensor, update_stats: bool = False) -> torch.Tensor:
    """The text CNN as ``nn.Conv1d`` computes it over (N, C, L), with the model's parameters: the feature before the
    head's BatchNorm, (N, 2048). BatchNorm uses batch statistics in training mode (running statistics are updated
    only with ``update_stats``) and the running ones in eval mode."""
    import torch.nn.functional as F

    def bn(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        mean, var = (m.running_mean, m.running_var) if update_stats else (m.running_mean.clone(), m.running_var.clone())
        return F.batch_norm(x, mean, var, m.weight, m.bias, model.training, m.momentum, m.eps)

    x = bn(model.embed_bn, (model.embed(tokens) + model.embed_bias).transpose(1, 2))  # (N, 300, L)
    for blk in model.blocks:
        b = blk.branch
        y = F.relu(bn(b[1], F.conv1d(x, b[0].weight)))  # 1x1
        y = F.relu(bn(b[4], F.conv1d(F.pad(y, (1, 0)), b[3].conv.weight, stride=b[3].conv.stride)))  # 1x2, left pad
        y = bn(b[7], F.conv1d(y, b[6].weight))
        short = x if blk.shortcut is None else bn(blk.shortcut[1], F.conv1d(x, blk.shortcut[0].weight,
                                                                              stride=blk.shortcut[0].stride))
        x = F.relu(y + short)  # (N, C, L / stride)
    return model.fc(x.amax(dim=2) if model.pool == "max" else x.mean(dim=2))  # (N, 2048)


def model_features(model: TextCNN, tokens: torch.Tensor) -> torch.Tensor:
    """The same quantity from the model as it is (layout nlc): the input of the head's BatchNorm."""
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
    layouts = {"nlc": lambda t: model_features(model, t), "ncl": lambda t: conv1d_features(model, t)}

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
             f"warm-up calls. nlc = models/text_cnn.py as it is; ncl = the same parameters through F.conv1d over "
             f"(N, C, L) (conv1d_features), the implementation before 2026-12-05."]
    title = f"text CNN, (N, L, C) products vs (N, C, L) convolutions, {dev.type}"
    report(args, HEADING, title, notes, lines)


if __name__ == "__main__":
    main()
