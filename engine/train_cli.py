"""Command line shared by train_stage1.py and train_stage2.py (thin wrappers that fix the stage)."""
from __future__ import annotations

import argparse

from utils.cli import ArgumentParser, run_guarded

from .config import ConfigError, load_config, parse_overrides

STAGE_TEXT = {
    1: "Stage I: the image backbone is frozen (weights and BN running statistics); both paths are trained to "
       "classify every training instance through the one shared classifier W (instance loss).",
    2: "Stage II: everything is fine-tuned with the backbone multipliers of the original code; loss = "
       "lambda_rank x ranking loss (hard negatives from a pool of candidates) + the two instance losses.",
}


def parse(stage: int, argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    p = ArgumentParser(
        prog=f"train_stage{stage}.py", description=STAGE_TEXT[stage],
        epilog="Any config key can be overridden as --key value (e.g. --lr_schedule '[[2, 1.0]]' --workers 4); "
               "unknown keys are rejected with the list of valid ones.")
    p.add_argument("--config", required=True,
                   help=f"recipe YAML under configs/ (e.g. configs/flickr30k_stage{stage}.yaml)")
    p.add_argument("--data", required=True, help="prepared directory written by python -m prepare.<dataset>")
    p.add_argument("--out", required=True, help="run directory: checkpoints, config.yaml, tb/ (TensorBoard)")
    if stage == 2:
        p.add_argument("--init", required=True, help="Stage I checkpoint to start from (its checkpoint_last.pt)")
    p.add_argument("--resume", default="auto", metavar="auto|PATH|none",
                   help="continue from RUN_DIR/checkpoint_last.pt when it exists (auto, the default), from PATH, "
                        "or start over (none)")
    args, rest = p.parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
    except ConfigError as e:
        p.error(str(e))
    return args, overrides


def main(stage: int, argv: list[str] | None = None) -> int:
    args, overrides = parse(stage, argv)

    def body() -> None:
        cfg = load_config(args.config, overrides, stage=stage)  # a bad recipe fails before the trainer loads
        import models  # noqa: F401  (heavy imports after parsing; models/ installs the torchvision guard first)

        from .checkpoint import load_training
        from .loop import Trainer
        if stage == 2:  # a plain state dict (an easy mix-up with --pretrained) is refused before anything is built
            load_training(args.init, option="--init", mmap=True)
        resume = None if args.resume == "none" else args.resume
        summary = Trainer(cfg, args.data, args.out, init=getattr(args, "init", None), resume=resume).fit()
        if summary.get("stopped"):
            print(f"stopped by signal at epoch {summary['epoch']} batch {summary['batch']}; checkpoint written")
        else:
            print(f"done: {summary['steps']} steps; best val rsum {summary['best']['rsum']} at epoch "
                  f"{summary['best']['epoch']}")

    return run_guarded(body)
