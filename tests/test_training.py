"""The training engine (engine/loop.py, data.py) on the tiny synthetic dataset of tests/training_fixtures.py, on
the CPU: Stage I trains the text CNN and the image head while the pretrained backbone (weights and BN running
statistics) stays bit-identical, and the instance losses go down on a fixed batch; Stage II (from the Stage I
checkpoint) moves the backbone, logs the ranking term, mines Yn = argmax cosine in eval mode and leaves the model in
train mode (the vsepp "stuck in eval mode" defect); validation never touches the test split; TensorBoard gets every
loss, accuracy, LR, val metric and the retrieval grids. Checkpoints, resume and NaN: test_checkpoints.py; DDP:
test_ddp.py."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from engine import checkpoint as ckpt
from engine.loop import Trainer
from models import l2_normalize
from tests.training_fixtures import (STAGE2, STEPS_PER_EPOCH, backbone_state, changed,  # noqa: F401 (fixtures)
                                     one_thread, prepared, stage1, stage2, state_copy, tiny)


# ------------------------------------------------------------------------------------------------- Stage I
def test_stage1_fixed_batch_losses_decrease_backbone_frozen(prepared, tmp_path):
    # no dropout (a deterministic objective) and twice the base LR: clear progress in 8 steps
    trainer = Trainer(tiny(dropout=0.0, base_lr=0.2), prepared, tmp_path / "run")
    batch = trainer.batches[0]
    before = state_copy(trainer.module)
    before_backbone = backbone_state(trainer.module)
    trainer.model.train()
    logs = []
    for _ in range(8):
        trainer.train_step(batch)
        logs.append(trainer.step_values())
    for term in ("loss/instance_img", "loss/instance_txt", "loss/total"):
        values = [v[term] for v in logs]
        assert all(math.isfinite(x) for x in values), (term, values)
        assert values[-1] < values[0] - 0.05 and np.mean(values[-3:]) < np.mean(values[:3]), (term, values)
    assert "loss/rank" not in logs[0]
    after_backbone = backbone_state(trainer.module)
    assert not changed(before_backbone, after_backbone), "Stage I changed the frozen backbone"
    after = state_copy(trainer.module)
    assert changed(before, after, "text.")
    assert changed(before, after, "image.fc1")
    assert changed(before, after, "classifier.")


def test_stage1_fit_freezes_backbone_and_trains_the_rest(stage1):
    trainer = stage1["trainer"]
    assert stage1["summary"]["steps"] == STEPS_PER_EPOCH
    after_backbone = backbone_state(trainer.module)
    assert set(after_backbone) == set(stage1["initial_backbone"])
    assert any(k.endswith("running_mean") for k in after_backbone) and any(k.endswith("running_var")
                                                                            for k in after_backbone)
    assert not changed(stage1["initial_backbone"], after_backbone), "backbone weights or BN running stats moved"
    # ... also in the checkpoint on disk
    saved = ckpt.load(stage1["ckpt"])["model"]
    for k, v in stage1["initial_backbone"].items():
        assert torch.equal(saved["image.backbone." + k], v), k
    after = state_copy(trainer.module)
    text_changed = changed(stage1["initial"], after, "text.")
    assert any(k.endswith("weight") for k in text_changed)
    head_changed = changed(stage1["initial"], after, "image.fc1")
    assert {k for k in head_changed if k.endswith("weight")} >= {"image.fc1.weight", "image.fc1_1.weight"}
    assert any(k.endswith("running_mean") for k in head_changed)  # the new BN layers do move
    assert changed(stage1["initial"], after, "classifier.")
    names = {g["name"] for g in trainer.optimizer.param_groups}
    assert not any(n.startswith("backbone") for n in names), names
    keys = stage1["records"].keys()
    assert {"loss/instance_img", "loss/instance_txt", "loss/total"} <= keys and "loss/rank" not in keys


def test_validation_uses_val_split_only(stage1):
    splits = stage1["splits"]
    assert splits["encode_split"] == ["val"]  # one validation (1 epoch)
    for name, asked in splits.items():
        assert "test" not in asked, (name, asked)
    assert "val" in stage1["summary"]["history"][-1]


# ------------------------------------------------------------------------------------------------- Stage II
def test_stage2_moves_backbone_and_logs_rank_term(stage1, stage2):
    trainer = stage2["trainer"]
    assert stage2["summary"]["steps"] == STEPS_PER_EPOCH
    s1 = ckpt.load(stage1["ckpt"])["model"]
    assert all(torch.equal(stage2["initial"][k], s1[k]) for k in s1), "Stage II did not start from Stage I"
    after = state_copy(trainer.module)
    moved = changed(stage2["initial"], after, "image.backbone.")
    assert any(k.endswith("conv1.weight") for k in moved), moved
    assert any(k.endswith("running_mean") for k in moved), "backbone BN running stats frozen in Stage II"
    names = {g["name"] for g in trainer.optimizer.param_groups}
    assert {"backbone_conv", "backbone_conv1", "backbone_bn_w", "backbone_bn_b"} <= names
    records = stage2["records"].records
    ranks = [v["loss/rank"] for _, v in records if "loss/rank" in v]
    assert len(ranks) == STEPS_PER_EPOCH and all(math.isfinite(r) and r >= 0 for r in ranks)
    for _, v in records:
        if "loss/rank" in v:  # total = lambda_rank * rank / 2 (mean over B/2 anchors -> sum / B) + instance terms
            expect = 2.0 * v["loss/rank"] / 2 + v["loss/instance_img"] + 0.1 * v["loss/instance_txt"]
            assert v["loss/total"] == pytest.approx(expect, rel=1e-5)


def test_stage2_mining_picks_argmax_and_restores_train_mode(prepared, stage1, tmp_path):
    trainer = Trainer(tiny(**STAGE2), prepared, tmp_path / "run", init=stage1["ckpt"])
    module = trainer.module
    batch = trainer.batches[0]
    images = trainer.module.image.normalize(batch["images"])
    h = images.shape[0] // 2
    # Independently, in eval mode on a copy: cosine similarity of each anchor image with each candidate caption.
    ref = copy.deepcopy(module).eval()
    with torch.no_grad():
        anchor = l2_normalize(ref.image(images[:h])["rank"])
        pool = l2_normalize(ref.text(batch["cand_tokens"])["rank"])
    expected = (anchor @ pool.T).argmax(1)
    seen = {}

    def forward(images_in, tokens_in, **kw):  # stands in for trainer.model: records what the training forward gets
        seen["tokens"] = tokens_in.clone()
        seen["modes"] = [m.training for m in module.modules()]
        return module(images_in, tokens_in, **kw)

    module.train()
    trainer.stepper.model = forward
    trainer.train_step(batch)
    values = trainer.step_values()
    assert math.isfinite(values["loss/rank"])
    assert all(seen["modes"]), "the training forward ran with modules in eval mode"
    assert module.training and all(m.training for m in module.modules()), "mining left the model in eval mode"
    assert torch.equal(seen["tokens"][:h], batch["tokens"][:h])  # Yp untouched
    assert torch.equal(seen["tokens"][h:], batch["cand_tokens"][expected]), "Yn is not the hardest candidate"
    # the hardest candidate really is the argmax (not e.g. the first or a random one)
    sims = anchor @ pool.T
    assert torch.equal(sims.gather(1, expected[:, None])[:, 0], sims.max(1).values)
    # _mine itself, called directly, also restores train mode
    module.train()
    neg_tokens, neg_labels = trainer._mine(images, batch)
    assert neg_tokens.shape == (h, batch["tokens"].shape[1]) and neg_labels.shape == (h,)
    assert module.training and all(m.training for m in module.modules())


def test_stage2_mining_differs_from_train_mode_selection(prepared, stage1, tmp_path):
    """Power check for the test above: selecting in train mode (batch statistics) would pick other candidates on
    this batch, so the eval-mode argmax check does distinguish the two."""
    trainer = Trainer(tiny(**STAGE2), prepared, tmp_path / "run", init=stage1["ckpt"])
    batch = trainer.batches[0]
    images = trainer.module.image.normalize(batch["images"])
    h = images.shape[0] // 2
    ref = copy.deepcopy(trainer.module)
    picks = {}
    for mode in ("eval", "train"):
        ref.train(mode == "train")
        with torch.no_grad():
            a = l2_normalize(ref.image(images[:h])["rank"])
            p = l2_normalize(ref.text(batch["cand_tokens"])["rank"])
        picks[mode] = (a @ p.T).argmax(1)
    assert not torch.equal(picks["eval"], picks["train"])


def test_tensorboard_has_losses_lrs_val_metrics_and_retrieval_grids(stage1):
    """The run directory's TensorBoard file holds every loss term, per-branch accuracy, each group's LR, val R@K
    and the retrieval image grids written at validation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(stage1["run"] / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    assert {"loss/instance_img", "loss/instance_txt", "loss/total", "acc/img_top1", "acc/txt_top1",
            "perf/pairs_per_s", "perf/data_wait_fraction", "lr/classifier_w", "lr/new_conv", "val/rsum",
            "val/t2i_R@1", "val/i2t_R@10"} <= scalars
    assert {"val/retrieval_t2i", "val/retrieval_i2t"} <= images
    grid = acc.Images("val/retrieval_t2i")[-1]
    assert grid.width > 100 and grid.height > 50


# ------------------------------------------------------------------------------------------------- Table 3 ablation
def test_text_init_random_is_table_3s_ablation(prepared, tmp_path):
    """``text_init: random`` starts Stage I's word2vec layer from U(+-sqrt(3/V)) instead of the word2vec rows (the
    padding row stays 0); Stage II takes the layer from the Stage I checkpoint whatever its own text_init says."""
    paper = Trainer(tiny(), prepared, tmp_path / "w2v")
    w2v = paper.data.word2vec()
    assert torch.equal(paper.module.text.embed.weight[1:], w2v)
    ablation = Trainer(tiny(text_init="random"), prepared, tmp_path / "random")
    emb = ablation.module.text.embed.weight.detach()
    bound = math.sqrt(3.0 / ablation.data.vocab_size)
    assert not emb[0].any() and emb[1:].abs().max() <= bound and emb[1:].abs().max() > 0.9 * bound
    assert emb[1:].std() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # uniform, not the word2vec rows
    ablation.save()
    ablation.log.close()
    paper.log.close()
    s2 = Trainer(tiny(**STAGE2), prepared, tmp_path / "s2", init=tmp_path / "random" / ckpt.LAST)
    assert torch.equal(s2.module.text.embed.weight, emb)
    s2.log.close()


def test_stage1_ranking_loss_only_is_table_2s_ablation(prepared, tmp_path):
    """Stage I with lambda_rank > 0 (Table 2's "only ranking loss", lambda_img = lambda_txt = 0): Stage II's batches
    (anchors, negatives, hard negatives mined), J = lambda_rank * sum(L1 + L2) / B, the backbone still frozen."""
    cfg = tiny(lambda_rank=2.0, lambda_img=0.0, lambda_txt=0.0)
    t = Trainer(cfg, prepared, tmp_path / "rank")
    assert t.batches.spec.stage == 2 and t.stepper.mining and t.stepper.lambda_rank == 2.0
    backbone, before = backbone_state(t.module), state_copy(t.module)
    t.model.train()
    for b in range(STEPS_PER_EPOCH):
        batch = t.batches[b]
        assert "cand_tokens" in batch
        t.train_step(batch)
        v = t.step_values()
        assert v["loss/total"] == pytest.approx(2.0 * v["loss/rank"] * (batch["labels"].numel() // 2)
                                                / batch["labels"].numel(), rel=1e-5)
    after = state_copy(t.module)
    assert not changed(backbone, backbone_state(t.module))
    assert changed(before, after, "text.") and changed(before, after, "image.fc1")
    t.log.close()
    assert Trainer(tiny(), prepared, tmp_path / "paper").batches.spec.stage == 1  # the paper's Stage I
