"""Benchmark: does the captured step train like the eager one? (BENCHMARKS.md section 10; needs CUDA for the graph.)

From ONE Stage I checkpoint, the Flickr30k Stage II recipe (hard negatives, dropout, fp32 with TF32, channels_last)
is trained for --steps steps three times with the same seed and the same batches: eager, eager again (the baseline:
how much two eager runs differ, cuDNN's algorithm choice and atomics included) and captured (``compile:
cuda_graph``); with --inductor a fourth run, ``compile: inductor`` (captured, the CNNs compiled by inductor); with
--branch-streams, eager and captured with ``branch_streams: true`` (the two paths on two CUDA streams). Each
run uses the Trainer's own loader and step; the loss terms are read back after every step.

Reported: per loss term the largest and the mean absolute difference between the curves (eager vs eager, eager vs
captured); the relative difference of all weights (||a - b|| / ||a|| over every floating tensor, and the largest
per-tensor value) after --weights-at steps and at the end.

--one-step asks instead whether a difference is rounding: ONE batch (negatives mined once, dropout 0), the gradients
of the Stage II loss, per module, computed several ways against the same computation in float64 (the reference):
eager fp32 with TF32 off and on (how far fp32 rounding alone lands), eager TF32 on again (the run-to-run floor) and,
with --inductor, compile: inductor's compiled CNNs (TF32 on; --inductor-scope whole: the whole text CNN too). Each is
reported as ||g - g_ref|| / ||g_ref|| per module with ||g_ref||; a compiled difference far above eager's on a module
is not rounding.

--perturb REL adds the training-curve yardstick: eager again, from the same Stage I weights each multiplied by
(1 + REL N(0,1)); at REL = 2**-24 that is one rounding of every weight, so its difference after --weights-at steps is
how far this recipe's training amplifies rounding alone (hard-negative choices and max-pooling positions flip).

    .venv/bin/python bench/graph_parity.py                    # CUDA: 200 steps, weights after 20
    .venv/bin/python bench/graph_parity.py --steps 6 --weights-at 3 --train-images 128 --no-write   # smoke (CPU:
    #   the captured run is then the emulated graph of the tests)
    .venv/bin/python bench/graph_parity.py --one-step --inductor       # CUDA: is inductor's drift rounding?
    .venv/bin/python bench/graph_parity.py --steps 20 --perturb 6e-8 --no-captured   # how far training amplifies
    #   a rounding-sized change of the weights (any device)
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common  # noqa: F401  (puts the repository root on sys.path)
from common import (DEFAULT_CACHE, add_output_args, build_trainer, default_image_size, device,
                    pad_classifier, report, synthetic_prepared, table)

from utils.cli import ArgumentParser  # noqa: E402

HEADING = "## 10. Captured vs eager training step"
ONE_STEP_HEADING = "## 11. One step's gradients: rounding or not"


def perturb(module, relative: float, seed: int = 1234) -> None:
    """Multiply every floating parameter element by (1 + relative * n), n ~ N(0, 1) from a private generator (the
    global RNG, hence dropout's masks, is untouched): at relative = 2**-24 a change the size of one fp32 rounding."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                p.mul_((1 + relative * noise).to(p.device, p.dtype))


def train(config: str, data: Path, run: Path, ckpt1: Path, overrides: dict, steps: int, weights_at: int,
          emulate: bool, relative_noise: float = 0.0):
    """(per-step loss terms, weights after ``weights_at`` steps, weights at the end)."""
    import torch

    from engine.step import EmulatedGraph

    trainer = build_trainer(config, 2, data, run, overrides, stage1_ckpt=ckpt1)
    if relative_noise:
        perturb(trainer.module, relative_noise)
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


def module_of(name: str) -> str:
    """The group a parameter is reported under: its first two name components (image.backbone, text.blocks,
    text.embed_bias, classifier.weight, ...)."""
    return ".".join(name.split(".")[:2])


def one_step_gradients(config: str, data: Path, run: Path, ckpt1: Path, overrides: dict, compiled: str | None
                       ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], list[str]]:
    """({mode: {module: ||g - g_ref|| / ||g_ref||}}, {mode: {loss term: value}}, the modes): one Stage II batch, the
    gradients of its loss with the negatives mined once and the BN buffers restored before each computation; the
    reference is the same computation in float64. ``compiled``: None, "blocks" (compile: inductor's scope) or
    "whole" (the image and the whole text CNN, the scope of the 2026-12-04 18:00 measurements)."""
    import copy

    import torch

    from engine.step import INPUTS, compile_cnns
    from models import total_loss

    trainer = build_trainer(config, 2, data, run, {**overrides, "compile": "off", "dropout": 0.0},
                            stage1_ckpt=ckpt1)
    cfg, step, module = trainer.cfg, trainer.stepper, trainer.module
    x = {k: v.to(trainer.device) for k, v in trainer._next_batch().items() if k in INPUTS}
    images = module.image.normalize(x["images"], step.channels_last)  # (B, 3, H, W)
    tokens, text_labels = x["tokens"], x["text_labels"]
    if step.mining:  # once, so that every mode sees the same negatives
        h = images.shape[0] // 2
        neg_tokens, neg_labels = step.mine(images, x["cand_tokens"], x["cand_labels"])
        tokens, text_labels = tokens.clone(), text_labels.clone()
        tokens[h:], text_labels[h:] = neg_tokens, neg_labels
    buffers = {k: v.clone() for k, v in module.state_dict().items()}
    names = [n for n, p in module.named_parameters() if p.requires_grad]

    def grads(net: torch.nn.Module = module, inputs: torch.Tensor = images
              ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        net.load_state_dict(buffers)
        net.train()
        params = dict(net.named_parameters())
        loss, terms = total_loss(net(inputs, tokens), x["labels"], text_labels, lambda_rank=step.lambda_rank,
                                 lambda_img=cfg.lambda_img, lambda_txt=cfg.lambda_txt, margin=cfg.margin,
                                 ranking=cfg.ranking_loss)
        g = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        return ({n: (gi if gi is not None else torch.zeros_like(params[n])).detach().double() for n, gi in
                 zip(names, g)}, {k: float(v) for k, v in terms.items()})

    def tf32(on: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    results = {"float64 (reference)": grads(copy.deepcopy(module).double(), images.double())}
    try:
        for mode, on in (("eager fp32, TF32 off", False), ("eager, TF32 on", True), ("eager, TF32 on, again", True)):
            tf32(on)
            results[mode] = grads()
        if compiled:
            tf32(True)
            if compiled == "blocks":
                compile_cnns(module)  # what compile: inductor does (engine/step.py)
            else:
                for m in (module.image, module.text):
                    m.compile(dynamic=False)
            grads()  # compiles
            results[f"inductor ({'image CNN + text blocks' if compiled == 'blocks' else 'whole CNNs'}), TF32 on"] = \
                grads()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
        trainer._iter = None
        trainer.log.close()
    ref = results["float64 (reference)"][0]
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(module_of(n), []).append(n)
    rel: dict[str, dict[str, float]] = {"||g_ref||": {}}
    for gname, members in groups.items():
        rel["||g_ref||"][gname] = float(sum(ref[n].pow(2).sum() for n in members)) ** 0.5
    for mode, (g, _) in results.items():
        rel[mode] = {}
        for gname, members in groups.items():
            num = float(sum((g[n] - ref[n]).pow(2).sum() for n in members)) ** 0.5
            rel[mode][gname] = num / max(rel["||g_ref||"][gname], 1e-30)
    return rel, {mode: terms for mode, (_, terms) in results.items()}, list(results)


def report_one_step(args: argparse.Namespace, data: Path, ckpt1: Path, overrides: dict, tmp: Path) -> None:
    scope = (args.inductor_scope or "blocks") if args.inductor else None
    rel, terms, modes = one_step_gradients(args.config, data, tmp / "one_step", ckpt1, overrides, scope)
    compared = [m for m in modes if not m.endswith("(reference)")]
    rows = [[g, f"{rel['||g_ref||'][g]:.3g}", *(f"{rel[m][g]:.2g}" for m in compared)] for g in rel["||g_ref||"]]
    rows += [[f"loss/{k}", f"{v:.6g}", *(f"{terms[m][k] - v:+.2g}" for m in compared)]
             for k, v in terms[modes[0]].items()]
    lines = table(["module (parameters) / loss term", "||g_ref|| / reference value",
                   *(f"{m}: rel. diff / diff" for m in compared)], rows, "l" + "r" * (1 + len(compared)))
    title = f"{Path(args.config.format(stage=2)).name}, one batch from one Stage I checkpoint, {device().type}"
    notes = [f"Data: {data} (synthetic, {args.train_images} classes; W padded to {args.classifier_classes} rows); "
             "dropout 0; negatives mined once; BN buffers restored before each computation. Per module "
             "||g - g_ref|| / ||g_ref||, the reference being the same computation in float64: eager fp32 (TF32 off, "
             "then on) shows how far fp32 rounding alone is from it, 'again' the run-to-run floor; a compiled column "
             "far above eager's on a module computes something else there. A group whose ||g_ref|| is near 0 (e.g. "
             "text.embed_bias, whose gradient the BatchNorm after it cancels) has no meaningful relative difference."]
    report(args, ONE_STEP_HEADING, title, notes, lines)


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--weights-at", type=int, default=20, help="compare the weights after this many steps too")
    ap.add_argument("--config", default="configs/flickr30k_stage{stage}.yaml")
    ap.add_argument("--dropout", type=float, default=None, help="config override (default: the config's); 0 takes "
                    "the random masks out of the comparison (inductor draws its own)")
    ap.add_argument("--inductor", action="store_true", help="also compile: inductor (captured, the image CNN and the "
                    "text CNN's blocks compiled by inductor; CUDA only, except with --one-step)")
    ap.add_argument("--perturb", type=float, default=0.0, metavar="REL", help="also eager from the Stage I weights "
                    "each multiplied by (1 + REL N(0,1)): with REL = 6e-8 (2**-24) a rounding-sized change, the "
                    "yardstick of how far training amplifies rounding within --steps (default: off)")
    ap.add_argument("--branch-streams", action="store_true", help="also branch_streams: true, eager and captured "
                    "(the image and text paths on two CUDA streams; CUDA only)")
    ap.add_argument("--no-captured", action="store_true", help="skip the captured run (e.g. with --perturb on CPU)")
    ap.add_argument("--inductor-scope", choices=("blocks", "whole"), default=None, help="with --one-step --inductor: "
                    "blocks = compile: inductor's (the image CNN and the text CNN's blocks; default), whole = the "
                    "image and the whole text CNN (the scope of the 2026-12-04 18:00 speed and drift figures; on "
                    "CPU it aborts the process)")
    ap.add_argument("--one-step", action="store_true", help="one batch's gradients per module against float64: "
                    "eager TF32 off, on (and inductor with --inductor), instead of the training curves (BENCHMARKS.md "
                    "section 11)")
    ap.add_argument("--train-images", type=int, default=4096, help="synthetic training images = classes")
    ap.add_argument("--classifier-classes", type=int, default=29783, help="rows of the shared W (Flickr30k's)")
    ap.add_argument("--image-size", type=int, default=None, help="synthetic prepared size (default from the crop)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="synthetic data cache (default %(default)s)")
    add_output_args(ap)
    args = ap.parse_args()
    if not 1 <= args.weights_at <= args.steps:
        ap.error("--weights-at must be between 1 and --steps")
    import torch  # after parsing

    if args.inductor and not args.one_step and not torch.cuda.is_available():
        ap.error("--inductor needs CUDA here (compile: inductor is CUDA only); --one-step --inductor also runs on CPU")
    if args.branch_streams and (args.one_step or not torch.cuda.is_available()):
        ap.error("--branch-streams needs CUDA and a training run (not --one-step)")
    if args.inductor_scope and not (args.one_step and args.inductor):
        ap.error("--inductor-scope goes with --one-step --inductor")

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
        if args.one_step:
            report_one_step(args, data, ckpt1, overrides, Path(tmp))
            return
        # (name, compile, relative weight noise, branch_streams)
        modes = [("eager", "off", 0.0, False), ("eager again", "off", 0.0, False)]
        modes += [] if args.no_captured else [("captured", "cuda_graph", 0.0, False)]
        modes += [("eager + streams", "off", 0.0, True)] if args.branch_streams else []
        modes += ([("captured + streams", "cuda_graph", 0.0, True)] if args.branch_streams and not args.no_captured
                  else [])
        modes += ([(f"eager, weights x (1 + {args.perturb:.2g} N(0,1))", "off", args.perturb, False)] if args.perturb
                  else [])
        modes += [("captured + inductor", "inductor", 0.0, False)] if args.inductor else []
        for name, mode, noise, streams in modes:
            runs[name] = train(args.config, data, Path(tmp) / f"run{len(runs)}", ckpt1,
                               {**overrides, "compile": mode if cuda else "off", "branch_streams": streams},
                               args.steps, args.weights_at,
                               emulate=mode == "cuda_graph" and not cuda,  # CPU: the tests' emulated graph
                               relative_noise=noise)
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
             f"{'CUDA' if cuda else 'CPU' if args.no_captured else 'CPU (captured = emulated graph)'}")
    notes = [f"Data: {data} (synthetic, {args.train_images} classes; the shared W padded to "
             f"{args.classifier_classes} rows); pretrained none; precision {base.precision}; dropout "
             f"{overrides.get('dropout', base.dropout)}; "
             f"seed {base.seed}. Each run starts from the same Stage I checkpoint and sees the same batches."]
    report(args, HEADING, title, notes, lines)


if __name__ == "__main__":
    main()
