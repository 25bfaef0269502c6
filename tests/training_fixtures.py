"""Shared by the training-engine tests (test_training.py, test_checkpoints.py, test_ddp.py, test_step.py,
test_cuda_step.py): one prepared dataset (48 synthetic images: 32 train / 8 val / 8 test, 40 px), tiny models
(ResNet-18 random init, 32-px crops, 64-d features, text CNN at 1/16 width), and the Stage I / Stage II runs several
tests inspect. A module that imports the fixtures gets its own copies (module scope: ~2.5 s)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # also when test_ddp.py runs as the DDP worker
    sys.path.insert(0, str(ROOT))

import models  # noqa: E402,F401  (torchvision guard first)
import pytest  # noqa: E402
import torch  # noqa: E402

import engine.loop as loop  # noqa: E402
from engine import checkpoint as ckpt  # noqa: E402
from engine.config import Config  # noqa: E402
from engine.data import Prepared  # noqa: E402
from engine.loop import Trainer  # noqa: E402

TINY = dict(dataset="synthetic", arch="resnet18", pretrained="none", train_crop=32, feature_dim=64,
            text_width=0.0625, batch_size=8, workers=0, eval_batch_size=16, num_candidates=16,
            lr_schedule=[[1, 1.0]], log_every=1, dropout=0.0, seed=0)
STAGE2 = dict(stage=2, lambda_rank=2.0, lambda_img=1.0, lambda_txt=0.1, negatives="hard", dropout=0.5)
STEPS_PER_EPOCH = 4  # 32 training images / batch 8
# The CLI runs (kill / SIGTERM): configs/demo.yaml + these overrides; 2 epochs, a checkpoint after every step.
CLI_OVERRIDES = dict(arch="resnet18", pretrained="none", train_crop=32, feature_dim=64, text_width=0.0625,
                     batch_size=8, workers=0, eval_batch_size=16, lr_schedule=[[2, 1.0]], log_every=1,
                     dropout=0.5, checkpoint_every_steps=1, val_every=1, backbone_bn="paper")
# One thread everywhere: these models are tiny, several OpenMP threads only fight over 2 (shared) cores, and the
# in-process resume of the SIGTERM test must run with the thread count of the subprocesses to be bit-identical.
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def tiny(**kw) -> Config:
    return Config(**{**TINY, **kw})


def backbone_state(module) -> dict[str, torch.Tensor]:
    """Backbone parameters and BN running statistics (num_batches_tracked is a counter, not a statistic)."""
    return {k: v.detach().clone() for k, v in module.image.backbone.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def state_copy(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict, prefix: str = "") -> list[str]:
    return [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]


class ScalarRecorder:
    """Wraps a RunLogger's ``scalars`` to keep every logged dict."""

    def __init__(self, trainer: Trainer) -> None:
        self.records: list[tuple[int, dict]] = []
        real = trainer.log.scalars

        def scalars(values, step):
            self.records.append((step, dict(values)))
            real(values, step)

        trainer.log.scalars = scalars

    def keys(self) -> set[str]:
        return {k for _, v in self.records for k in v}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("train_data"))


def make_prepared(root: Path) -> Path:
    """48 synthetic images (32 train classes, 8 val, 8 test) prepared at 40 px by the real Flickr30k preparer."""
    from prepare.flickr30k import main as prepare_flickr30k
    from prepare.synthetic import make_synthetic

    raw = make_synthetic(root / "raw", images=48, val=8, test=8, seed=0)
    out = root / "prepared"
    rc = prepare_flickr30k(["--images", raw["images_dir"], "--captions", raw["captions"], "--split-json",
                            raw["split_json"], "--word2vec", raw["word2vec"], "--out", str(out),
                            "--image-size", "40", "--workers", "1"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def stage1(prepared, tmp_path_factory):
    """One in-process Stage I epoch (4 steps + validation). Records the initial weights, every logged scalar and
    every split the run reads."""
    run = tmp_path_factory.mktemp("stage1")
    splits: dict[str, list] = {"encode_split": [], "split_images": [], "split_captions": []}
    with pytest.MonkeyPatch.context() as mp:
        real_encode, real_images, real_captions = loop.encode_split, Prepared.split_images, Prepared.split_captions

        def encode_split(model, data, split, *a, **k):
            splits["encode_split"].append(split)
            return real_encode(model, data, split, *a, **k)

        def split_images(self, split):
            splits["split_images"].append(split)
            return real_images(self, split)

        def split_captions(self, split, *a, **k):
            splits["split_captions"].append(split)
            return real_captions(self, split, *a, **k)

        mp.setattr(loop, "encode_split", encode_split)
        mp.setattr(Prepared, "split_images", split_images)
        mp.setattr(Prepared, "split_captions", split_captions)
        cfg = tiny()
        trainer = Trainer(cfg, prepared, run)
        initial = state_copy(trainer.module)
        initial_backbone = backbone_state(trainer.module)
        rec = ScalarRecorder(trainer)
        summary = trainer.fit()
    return dict(run=run, cfg=cfg, trainer=trainer, initial=initial, initial_backbone=initial_backbone,
                records=rec, summary=summary, splits=splits, ckpt=run / ckpt.LAST)


@pytest.fixture(scope="module")
def stage2(prepared, stage1, tmp_path_factory):
    run = tmp_path_factory.mktemp("stage2")
    cfg = tiny(**STAGE2)
    trainer = Trainer(cfg, prepared, run, init=stage1["ckpt"])
    initial = state_copy(trainer.module)
    rec = ScalarRecorder(trainer)
    summary = trainer.fit()
    return dict(run=run, cfg=cfg, trainer=trainer, initial=initial, records=rec, summary=summary)
