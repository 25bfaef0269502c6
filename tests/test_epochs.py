"""An epoch's batches (spec 7.1, 7.4, 7.5): every training image once per epoch, the leftover images as a last,
smaller batch (the original's ``cnn_train_dag*.m``; Stage II: reduced to an even size), every caption of a class
drawn (empty ones included, as the original's ``randi``), Stage II negatives the same for any rank count (random
negatives), and the captured step, whose graph has the full batch's shapes, training the smaller last batch eagerly
with the same result as an eager run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import config_from_dict
from engine.data import Prepared, TrainBatches, TrainSpec, epoch_batches
from engine.loop import Trainer
from engine.step import EmulatedGraph
from tests.training_fixtures import STAGE2, make_prepared, one_thread, tiny  # noqa: F401 (autouse)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("epoch_data"))  # 32 training images, one class each


# ------------------------------------------------------------------------------------------- sizes (spec 7.4)
@pytest.mark.parametrize("name,n_images,iterations", [("Flickr30k", 29_783, 931), ("MSCOCO", 113_287, 3_541),
                                                      ("CUHK-PEDES", 34_054, 1_065)])
def test_iterations_per_epoch_are_the_spec_s(name, n_images, iterations):
    for stage in (1, 2):
        full, last = epoch_batches(n_images, 32, stage)
        assert full + (last > 0) == iterations, (name, stage)
    assert epoch_batches(n_images, 32, 1, last_batch="drop") == (iterations - 1, 0)


def test_last_batch_sizes_by_hand():
    assert epoch_batches(29_783, 32, 1) == (930, 23)  # Stage I keeps all 23 leftover images
    assert epoch_batches(29_783, 32, 2) == (930, 22)  # Stage II: an odd-sized last batch is reduced by one
    assert epoch_batches(29_783, 32, 2, world_size=4) == (930, 16)  # 4 ranks: a multiple of 2 x 4
    assert epoch_batches(29_783, 32, 1, world_size=4) == (930, 20)
    assert epoch_batches(65, 32, 1) == (2, 0)  # one image left: no training-mode BatchNorm on a batch of 1
    assert epoch_batches(67, 32, 2, world_size=2) == (2, 0)  # 3 left: not 2 anchors on each of 2 ranks
    assert epoch_batches(64, 32, 2) == (2, 0)


# ------------------------------------------------------------------------------------------- real batches
def test_every_training_image_once_per_epoch_with_a_smaller_last_batch(prepared):
    data = Prepared(prepared)
    train = set(data.split_images("train").tolist())  # 32 = 2 x 12 + 8
    for epoch in (0, 1):
        tb = TrainBatches(data, TrainSpec(stage=1, batch_size=12, crop=16, seed=0), epoch=epoch)
        batches = [tb[b] for b in range(len(tb))]
        assert [len(b["labels"]) for b in batches] == [12, 12, 8]
        assert sorted(torch.cat([b["labels"] for b in batches]).tolist()) == sorted(train)  # one class per image
    dropped = TrainBatches(data, TrainSpec(stage=1, batch_size=12, crop=16, seed=0, last_batch="drop"))
    assert len(dropped) == 2


def test_stage2_last_batch_halves_and_pool(prepared):
    data = Prepared(prepared)
    tb = TrainBatches(data, TrainSpec(stage=2, batch_size=14, crop=16, seed=0, num_candidates=64))  # 2 x 14 + 4
    assert [tb.batch_size_of(b) for b in range(len(tb))] == [14, 14, 4]
    last = tb[2]
    assert last["images"].shape[0] == 4 and last["tokens"].shape[0] == 4
    rows = tb.permutation()[28:32]  # anchors = positions 28, 29; their negatives 30, 31
    assert last["labels"].tolist() == data.images["label"].to_numpy()[rows].tolist()
    assert not set(last["cand_labels"].tolist()) & set(last["labels"].tolist())  # the pool is outside the batch


@pytest.mark.parametrize("negatives", ["random", "hard"])
def test_two_ranks_take_disjoint_halves_of_the_last_batch(prepared, negatives):
    data = Prepared(prepared)
    spec = TrainSpec(stage=2, batch_size=12, crop=16, seed=2, negatives=negatives, num_candidates=16)
    one = TrainBatches(data, spec)
    assert len(one) == 3 and one.batch_size_of(2) == 8  # 32 = 2 x 12 + 8: 2 anchors + 2 negatives per rank
    whole = one[2]
    shards = [TrainBatches(data, TrainSpec(**{**spec.__dict__, "world_size": 2, "rank": r}))[2] for r in range(2)]
    for k in ("images", "labels") + (("tokens", "text_labels") if negatives == "random" else ()):
        glob = whole[k].view(2, 2, 2, *whole[k].shape[1:])  # (half, rank, local, ...)
        for r, s in enumerate(shards):
            assert torch.equal(s[k], glob[:, r].reshape(4, *whole[k].shape[1:])), (k, r)


def test_empty_captions_are_drawn_like_any_other(prepared):
    """A caption without a dictionary word is an all-padding input in the original (it samples it); a class whose
    captions are all empty trains on that input instead of refusing the data."""
    data = Prepared(prepared)
    caps = data.captions
    cls = int(data.images["label"].iat[int(data.split_images("train")[0])])
    data.captions = caps.assign(length=np.where(caps["label"].to_numpy() == cls, 0, caps["length"].to_numpy()))
    tb = TrainBatches(data, TrainSpec(stage=1, batch_size=8, crop=16, seed=0))
    seen = 0
    for b in range(len(tb)):
        batch = tb[b]
        for i in torch.nonzero(batch["labels"] == cls).flatten().tolist():
            assert not batch["tokens"][i].any()
            seen += 1
        assert all(batch["tokens"][i].any() for i in range(len(batch["labels"])) if batch["labels"][i] != cls)
    assert seen == 1


# ------------------------------------------------------------------------------------------- training
def train_epochs(t: Trainer, epochs: int) -> list[float]:
    t.model.train()
    losses = []
    for epoch in range(epochs):
        for b in range(len(t.batches)):
            batch = t.batches[(epoch, b)]
            batch.pop("key")
            t.train_step(batch)
            losses.append(t.step_values()["loss/total"])
        t.scheduler.step()
    return losses


@pytest.mark.parametrize("stage", [1, 2])
def test_captured_step_trains_the_smaller_last_batch_like_eager(prepared, tmp_path, stage):
    init = None
    if stage == 2:
        s1 = Trainer(tiny(), prepared, tmp_path / "s1")
        s1.save()
        s1.log.close()
        init = tmp_path / "s1" / ckpt.LAST
    cfg = tiny(**{"batch_size": 12, "lr_schedule": [[1, 1.0], [2, 0.1]], "dropout": 0.5,
                  **(STAGE2 if stage == 2 else {})})
    captures = []

    def factory():
        captures.append(1)
        return EmulatedGraph()

    runs = {}
    for name in ("eager", "captured"):
        t = Trainer(cfg, prepared, tmp_path / name, init=init, graph_factory=factory if name == "captured" else None)
        assert [t.batches.batch_size_of(b) for b in range(len(t.batches))] == [12, 12, 8]
        runs[name] = (train_epochs(t, 3), {k: v.clone() for k, v in t.module.state_dict().items()}, t)
        t.log.close()
    (eager, eager_state, _), (captured, captured_state, t) = runs["eager"], runs["captured"]
    assert len(eager) == 9 and eager == captured  # bit-identical loss of every step, the 8-image ones included
    for k, v in eager_state.items():
        assert torch.equal(v, captured_state[k]), k
    assert len(captures) == 1 and t.stepper.graph is not None
    assert all(p.grad is None for p in t.module.parameters())  # the last eager step's gradients were freed


def test_fit_counts_pairs_and_steps_with_the_last_batch(prepared, tmp_path):
    t = Trainer(tiny(batch_size=12, lr_schedule=[[2, 1.0]], log_every=2), prepared, tmp_path / "run")
    windows = []
    real = t._log_window
    t._log_window = lambda pairs, *a: (windows.append((t.step, pairs)), real(pairs, *a))[1]
    summary = t.fit()
    assert summary["steps"] == 6 and t.step == 6
    # a window ends every 2 steps and at each epoch's end; its pairs/s counts the images it trained on
    assert windows == [(2, 24), (3, 8), (4, 12), (6, 20)]


def test_checkpoints_from_before_the_key_resume_as_they_trained(prepared, tmp_path):
    """A checkpoint written before ``last_batch`` existed trained with the last batch dropped: its config reads
    back as ``drop``, and resuming it under today's default is refused naming the key."""
    t = Trainer(tiny(last_batch="drop"), prepared, tmp_path / "old")
    t.save()
    t.log.close()
    state = torch.load(tmp_path / "old" / ckpt.LAST, weights_only=True)
    del state["config"]["last_batch"]
    torch.save(state, tmp_path / "old" / ckpt.LAST)
    assert config_from_dict(state["config"]).last_batch == "drop"
    Trainer(tiny(last_batch="drop"), prepared, tmp_path / "old", resume="auto").log.close()  # resumes
    with pytest.raises(Exception, match="last_batch"):
        Trainer(tiny(), prepared, tmp_path / "old", resume="auto")
