"""Benchmark: where one training step's device time goes (BENCHMARKS.md section 12).

The captured step (``compile: cuda_graph``) is bound by the GPU's own work at the paper's batch of 32 (section 1:
'host in step' is no longer the limit), so the question for the next speed-up is which computation costs what. Each
part of the real step is run alone on one batch already on the device, using the Trainer's own module, optimizer and
precision, and on CUDA captured in its own CUDA graph (so its time is the kernels', not Python's launches):

    image path   the image CNN forward + the shared W + its instance loss, backward (Stage I: the frozen backbone
                 runs forward only, as in training)
    text path    the same for the text CNN on the batch's captions
    mining: image CNN   Stage II (hard negatives): the anchors' eval-mode forward (spec 7.5 step 2)
    mining: text CNN    the candidates' eval-mode forward (step 3)
    mining: hardest     cosine similarities and the argmax (step 4)
    optimizer    the SGD step over every trainable tensor (fused on CUDA)

and beside them the Trainer's whole step (``TrainStep.run`` in the run's mode, captured on CUDA). 'rest' = whole -
sum of the parts: the losses' combination, the ranking loss, input normalisation, the device statistics, and what
separate graphs do not share. Each part's 'pairs/s if alone' is the batch over its time: the ceiling that part
sets on the step. Every part starts from the state the whole step left (weights, BatchNorm statistics, gradients,
momentum restored in place); its repeated calls then accumulate gradients and move weights: a throw-away Trainer.

    .venv/bin/python bench/step_breakdown.py                    # CUDA: Flickr30k ResNet-50 recipes; CPU: the demo
    .venv/bin/python bench/step_breakdown.py --stage 2 --precision fp32 bf16
"""
from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path
from typing import Callable

import common  # noqa: F401  (puts the repository root on sys.path)
from common import (add_output_args, add_recipe_args, build_trainer, default_image_size, device, model_step_fn,
                    pad_classifier, recipe_defaults, report, synthetic_prepared, table, time_repeated)

from utils.cli import ArgumentParser  # noqa: E402

HEADING = "## 12. Where a training step's device time goes"


def step_parts(trainer, batch: dict, results: dict | None = None) -> dict[str, Callable[[], None]]:
    """The parts of ``trainer``'s step as closures on one batch (moved to the device here), in the step's order.
    The mining parts leave their outputs in ``results``: "anchor" (h, D), "pool" (P, D), "idx" (h,)."""
    import torch

    from engine.encode import autocast
    from models import hardest_negatives, instance_loss

    module, dev, cfg = trainer.module, trainer.device, trainer.cfg
    images = module.image.normalize(batch["images"].to(dev), trainer.channels_last)  # (B, 3, H, W)
    tokens, labels = batch["tokens"].to(dev), batch["labels"].to(dev)  # (B, L), (B,)
    text_labels = batch["text_labels"].to(dev)
    capture = dev.type == "cuda"  # autocast's weight cache must not outlive a graph capture

    def image_path() -> None:
        with autocast(dev, cfg.precision, cache=not capture):
            out = module(images=images)
        instance_loss(out["img_logits"], labels).backward()

    def text_path() -> None:
        with autocast(dev, cfg.precision, cache=not capture):
            out = module(tokens=tokens)
        instance_loss(out["txt_logits"], text_labels).backward()

    parts = {"image path (forward + W + backward)": image_path, "text path (forward + W + backward)": text_path}
    if cfg.ranking_batches and cfg.negatives == "hard":
        h = images.shape[0] // 2
        cand = batch["cand_tokens"].to(dev)  # (P, L)
        feats = {} if results is None else results

        def eval_forward(key: str, fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def run() -> None:
                module.eval()
                try:
                    with torch.no_grad(), autocast(dev, cfg.precision, cache=not capture):
                        feats[key] = fn()
                finally:
                    module.train()
            return run

        mine_image = eval_forward("anchor", lambda: module.image(images[:h])["rank"])  # (h, 2048)
        mine_text = eval_forward("pool", lambda: module.text(cand)["rank"])  # (P, 2048)
        mine_image(), mine_text()  # the inputs of the argmax part
        anchor, pool = feats["anchor"].clone(), feats["pool"].clone()
        parts[f"mining: image CNN, {h} anchors (eval forward)"] = mine_image
        parts[f"mining: text CNN, {cand.shape[0]} candidates (eval forward)"] = mine_text

        def hardest() -> None:
            feats["idx"] = hardest_negatives(anchor, pool)  # (h,)

        parts["mining: hardest (similarities + argmax)"] = hardest
    fused = trainer.optimizer.defaults.get("fused")
    parts[f"optimizer ({'fused ' if fused else ''}SGD step)"] = trainer.optimizer.step
    return parts


def graphed(fn: Callable[[], None], dev) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (after 3 warm-up calls on a side stream), returned as its replay; on CPU
    ``fn`` itself."""
    import torch

    if dev.type != "cuda":
        return fn
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class Snapshot:
    """The module's weights and buffers, the gradients and the optimizer's state, restored in place (the captured
    graphs keep their addresses): every part starts from the state the whole step left, so repeated calls cannot
    drift into huge or non-finite values (which would time other arithmetic, e.g. denormals on a CPU)."""

    def __init__(self, trainer) -> None:
        self.tensors = [t for t in trainer.module.state_dict().values()]
        self.tensors += [p.grad for p in trainer.module.parameters() if p.grad is not None]
        self.tensors += [v for st in trainer.optimizer.state.values() for v in st.values() if hasattr(v, "copy_")]
        self.saved = [t.detach().clone() for t in self.tensors]

    def restore(self) -> None:
        for t, s in zip(self.tensors, self.saved):
            t.detach().copy_(s)


def measure(trainer, steps: int, warmup: int) -> list[tuple[str, float]]:
    """(name, seconds per call) of the whole step, then of each part."""
    batch = trainer.batches[0]
    dev = trainer.device
    whole = time_repeated(model_step_fn(trainer, batch), steps, dev, warmup)  # first: it captures its own graph
    out = [(f"whole step ({trainer.mode})", whole)]
    snapshot = Snapshot(trainer)
    for name, fn in step_parts(trainer, batch).items():
        snapshot.restore()
        out.append((name, time_repeated(graphed(fn, dev), steps, dev, warmup=2)))
        print(f"stage {trainer.cfg.stage} {trainer.cfg.precision}: {name}: {1000 * out[-1][1]:.2f} ms", flush=True)
    return out


def rows_of(stage: int, precision: str, batch_size: int, timings: list[tuple[str, float]]) -> list[list]:
    (whole_name, whole), parts = timings[0], timings[1:]
    rest = whole - sum(t for _, t in parts)
    rows = [[stage, precision, f"**{whole_name}**", f"{1000 * whole:.2f}", "100 %", f"{batch_size / whole:.0f}"]]
    rows += [[stage, precision, name, f"{1000 * t:.2f}", f"{100 * t / whole:.0f} %", f"{batch_size / t:.0f}"]
             for name, t in parts]
    rows.append([stage, precision, "rest (whole - parts)", f"{1000 * rest:.2f}", f"{100 * rest / whole:.0f} %", "–"])
    return rows


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, nargs="+", choices=(1, 2), default=[1, 2])
    ap.add_argument("--steps", type=int, default=None, help="timed calls per part (default 50 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls of the whole step, > 3 with cuda_graph "
                    "(default 8 on CUDA, 3 on CPU)")
    ap.add_argument("--compile", choices=("off", "cuda_graph", "inductor"), default=None,
                    help="the whole step's mode (default cuda_graph on CUDA, off on CPU)")
    ap.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=None,
                    help="precisions (default: the config's)")
    add_recipe_args(ap)  # --config --pretrained --data --train-images --classifier-classes --image-size --cache
    add_output_args(ap)
    args = ap.parse_args()
    import torch  # after parsing: --help answers at once (docs/cli.md)

    from engine.config import load_config
    from engine.data import Prepared
    from engine.step import GRAPH_WARMUP

    cuda = torch.cuda.is_available()
    args.steps = args.steps or (50 if cuda else 3)
    mode = args.compile or ("cuda_graph" if cuda else "off")
    args.warmup = args.warmup or (8 if cuda else 3)
    if mode != "off" and args.warmup <= GRAPH_WARMUP:
        ap.error(f"--warmup must exceed the {GRAPH_WARMUP} eager steps before the capture")
    recipe_defaults(args, cuda)
    stages = sorted(set(args.stage))
    base = load_config(common.config_path(args.config, stages[0]), {"pretrained": args.pretrained}, stage=stages[0])
    data = args.data or synthetic_prepared(args.train_images, args.image_size or default_image_size(base.train_crop),
                                           args.cache)
    classes = args.classifier_classes
    rows: list[list] = []
    with tempfile.TemporaryDirectory(prefix="bench_parts_") as tmp, pad_classifier(classes):
        ckpt1 = None
        for stage in stages:
            for precision in args.precision or [base.precision]:
                run = Path(tmp) / f"s{stage}_{precision}"
                trainer = build_trainer(args.config, stage, data, run, {"pretrained": args.pretrained,
                                                                        "compile": mode, "precision": precision},
                                        stage1_ckpt=ckpt1)
                if stage == 1 and 2 in stages and ckpt1 is None:
                    trainer.save()
                    ckpt1 = run / "checkpoint_last.pt"
                rows += rows_of(stage, precision, trainer.cfg.batch_size, measure(trainer, args.steps, args.warmup))
                trainer.log.close()
                del trainer
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
    p = Prepared(data)
    title = (f"{Path(args.config).name}: {base.arch}, crop {base.train_crop}, batch {base.batch_size}, W "
             f"{max(classes, p.num_classes)} classes{' + channels_last' if base.channels_last and cuda else ''}, "
             f"{args.steps} calls per part, {device().type}")
    kind = "synthetic" if args.data is None else p.manifest.get("dataset")
    notes = [f"Data: {data} ({kind}, one batch); pretrained {args.pretrained}. Each part alone on that batch"
             f"{', captured in its own CUDA graph' if cuda else ', eager'}: 'share' is of the whole step, 'pairs/s "
             "if alone' the batch over the part's time (the ceiling it sets); 'rest' = whole - parts (losses, "
             "ranking loss, normalisation, statistics; below 0 where the parts alone took longer than inside the "
             "whole step, as seen eager on a 2-core CPU)."]
    lines = table(["stage", "precision", "part", "ms", "share", "pairs/s if alone"], rows, "rrlrrr")
    report(args, HEADING, title, notes, lines)


if __name__ == "__main__":
    main()
