"""The captured training step on a real GPU (skipped without CUDA; run by bench/gpu_check.sh on a GPU host).

Tiny models, so the comparison is about the mechanics, not speed: ``compile: cuda_graph`` against eager over 20
steps of Stage I and Stage II (mining, dropout, an LR drop after step 8): one capture per run, the LR schedule seen
without a re-capture, losses and weights equal to eager within float tolerance; a non-finite J is caught with its
step under capture; bf16 autocast captures; the whole loop (one loader iterator, pinned copies, statistics read at
log steps, validation between epochs) runs captured and resumes into eager; ``compile: inductor`` (opt-in) trains,
its first step within rounding of eager's, and resumes into eager; bench/step_breakdown.py's parts, each captured in
its own graph, replay what they compute eagerly; an epoch's smaller last batch trains eagerly between replays;
``branch_streams: true`` runs the two paths on their own streams and trains like one stream, eager and captured.
"""
from __future__ import annotations

import math

import models  # noqa: F401  (torchvision guard first)
import pytest
import torch

import engine.step as step_mod
from engine import checkpoint as ckpt
from engine.loop import NonFiniteLoss, Trainer
from tests.test_epochs import train_epochs
from tests.test_step import SCHEDULE, sync_free, train_20
from tests.training_fixtures import STAGE2, STEPS_PER_EPOCH, make_prepared, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("cuda_data"))


@pytest.fixture(scope="module")
def stage1_ckpt(prepared, tmp_path_factory):
    run = tmp_path_factory.mktemp("s1")
    t = Trainer(tiny(compile="off"), prepared, run)
    t.save()
    t.log.close()
    return run / ckpt.LAST


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("stage", [1, 2])
def test_captured_equals_eager_on_cuda(prepared, stage1_ckpt, tmp_path, stage, monkeypatch):
    captures = []
    real = step_mod.CudaGraph

    def factory():
        captures.append(1)
        return real()

    cfg = {"lr_schedule": SCHEDULE, "dropout": 0.5, **(STAGE2 if stage == 2 else {})}
    init = stage1_ckpt if stage == 2 else None
    runs = {}
    for mode in ("off", "cuda_graph"):
        torch.backends.cudnn.deterministic = True  # the same convolution algorithms in both runs
        t = Trainer(tiny(**cfg, compile=mode), prepared, tmp_path / mode, init=init,
                    graph_factory=factory if mode == "cuda_graph" else None)
        assert t.mode == mode
        runs[mode] = (train_20(t, sync_free(t)), {k: v.clone() for k, v in t.module.state_dict().items()}, t)
        t.log.close()
    torch.backends.cudnn.deterministic = False
    assert len(captures) == 1
    (eager_logs, eager_w, eager_t), (graph_logs, graph_w, graph_t) = runs["off"], runs["cuda_graph"]
    assert isinstance(graph_t.stepper.graph, real) and graph_t.stepper.warm == step_mod.GRAPH_WARMUP
    for i, (a, b) in enumerate(zip(eager_logs, graph_logs)):
        for k in a:
            assert math.isfinite(b[k]) and b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-4), (i, k, a[k], b[k])
    for k, v in eager_w.items():
        if v.is_floating_point():
            assert close(v, graph_w[k]) < 1e-3, k
    lrs = [float(g["lr"]) for g in graph_t.optimizer.param_groups]
    assert lrs == pytest.approx([float(g["lr"]) for g in eager_t.optimizer.param_groups])
    assert lrs[0] == pytest.approx(graph_t.optimizer.param_groups[0]["initial_lr"] * 0.1)


@pytest.mark.parametrize("stage", [1, 2])
def test_smaller_last_batch_runs_eagerly_between_replays(prepared, stage1_ckpt, tmp_path, stage):
    """Batches of 12, 12, 8 (``last_batch: keep``) for 3 epochs: the 8-image step runs eagerly on the parameters,
    momentum and LR tensors the graph replays use, and the run stays within float tolerance of eager's."""
    cfg = {"batch_size": 12, "lr_schedule": [[1, 1.0], [2, 0.1]], "dropout": 0.5, **(STAGE2 if stage == 2 else {})}
    init = stage1_ckpt if stage == 2 else None
    runs = {}
    for mode in ("off", "cuda_graph"):
        torch.backends.cudnn.deterministic = True
        t = Trainer(tiny(**cfg, compile=mode), prepared, tmp_path / mode, init=init)
        runs[mode] = (train_epochs(t, 3), {k: v.clone() for k, v in t.module.state_dict().items()}, t)
        t.log.close()
    torch.backends.cudnn.deterministic = False
    (eager, eager_w, _), (graph, graph_w, graph_t) = runs["off"], runs["cuda_graph"]
    assert isinstance(graph_t.stepper.graph, step_mod.CudaGraph) and len(eager) == len(graph) == 9
    assert graph == pytest.approx(eager, rel=1e-3, abs=1e-4)
    for k, v in eager_w.items():
        if v.is_floating_point():
            assert close(v, graph_w[k]) < 1e-3, k


@pytest.mark.parametrize("stage", [1, 2])
def test_branch_streams_train_like_one_stream(prepared, stage1_ckpt, tmp_path, stage, monkeypatch):
    """``branch_streams: true``, eager and captured: each path runs on its own side stream (not the one that
    launched the step), and 20 steps (mining, dropout, an LR drop) stay within float tolerance of one stream's."""
    seen: list[int] = []
    real_call = step_mod.BranchStreams.__call__

    def spy(self, branches):
        def on_stream(fn):
            def run(*args):
                seen.append(torch.cuda.current_stream().stream_id)
                return fn(*args)
            return run
        launcher = torch.cuda.current_stream().stream_id
        out = real_call(self, [(on_stream(fn), args) for fn, args in branches])
        ids = {s.stream_id for s in self.streams}
        assert launcher not in ids and set(seen[-len(branches):]) == ids
        return out

    joins: list[int] = []
    real_join = step_mod.BranchStreams.join

    def counted_join(self):
        joins.append(1)
        real_join(self)

    monkeypatch.setattr(step_mod.BranchStreams, "__call__", spy)
    monkeypatch.setattr(step_mod.BranchStreams, "join", counted_join)
    cfg = {"lr_schedule": SCHEDULE, "dropout": 0.5, **(STAGE2 if stage == 2 else {})}
    init = stage1_ckpt if stage == 2 else None
    runs = {}
    for mode, streams in (("off", False), ("off", True), ("cuda_graph", True)):
        torch.backends.cudnn.deterministic = True
        t = Trainer(tiny(**cfg, compile=mode, branch_streams=streams), prepared, tmp_path / f"{mode}{streams}",
                    init=init)
        assert isinstance(t.stepper.run_branches, step_mod.BranchStreams) == streams
        before = len(joins)
        runs[(mode, streams)] = (train_20(t, sync_free(t)), {k: v.clone() for k, v in t.module.state_dict().items()})
        t.log.close()
        # after every backward in Python: 20 eager steps; captured, the warm-up steps and the capture (replays
        # run the captured join)
        assert len(joins) - before == (0 if not streams else 20 if mode == "off" else step_mod.GRAPH_WARMUP + 1)
    torch.backends.cudnn.deterministic = False
    assert seen, "the streams' runner never ran"
    ref_logs, ref_w = runs[("off", False)]
    for key in (("off", True), ("cuda_graph", True)):
        logs, w = runs[key]
        for i, (a, b) in enumerate(zip(ref_logs, logs)):
            for k in a:
                assert math.isfinite(b[k]) and b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-4), (key, i, k)
        for k, v in ref_w.items():
            if v.is_floating_point():
                assert close(v, w[k]) < 1e-3, (key, k)


def test_non_finite_is_caught_under_capture(prepared, tmp_path, monkeypatch):
    real = step_mod.total_loss
    calls = []

    def total_loss(out, *args, **kwargs):  # python runs only in the eager warm-up and the capture: poison the
        calls.append(1)                    # captured graph itself, so every replay is non-finite
        if len(calls) > step_mod.GRAPH_WARMUP:
            out = dict(out, img_logits=out["img_logits"] * float("nan"))
        return real(out, *args, **kwargs)

    monkeypatch.setattr(step_mod, "total_loss", total_loss)
    t = Trainer(tiny(compile="cuda_graph", log_every=2, checkpoint_every_steps=2, lr_schedule=[[2, 1.0]]), prepared,
                tmp_path / "run")
    with pytest.raises(NonFiniteLoss, match=rf"non-finite loss at step {step_mod.GRAPH_WARMUP} \(epoch 0, batch 3\)"):
        t.fit()
    state = ckpt.load(tmp_path / "run" / ckpt.LAST)
    assert state["step"] == 2  # the checkpoint after step 2 (steps 0-1) is the last one


def test_bf16_captures(prepared, tmp_path):
    t = Trainer(tiny(compile="cuda_graph", precision="bf16", dropout=0.5), prepared, tmp_path / "run")
    logs = train_20(t, sync_free(t))
    assert t.stepper.graph is not None and all(math.isfinite(v["loss/total"]) for v in logs)


def test_whole_loop_captured_then_resumed_eager(prepared, stage1_ckpt, tmp_path):
    run = tmp_path / "run"
    cfg = tiny(**{**STAGE2, "lr_schedule": [[2, 1.0], [1, 0.1]], "workers": 2, "log_every": 3})
    first = Trainer(tiny(**{**cfg.to_dict(), "compile": "cuda_graph"}), prepared, run, init=stage1_ckpt)
    real_step = first.train_step

    def step_then_stop(batch):
        real_step(batch)
        if first.step == 2 * STEPS_PER_EPOCH + 1:
            first.stop_signal = 15
    first.train_step = step_then_stop
    assert first.fit()["stopped"] and first.stepper.graph is not None
    state = ckpt.load(run / ckpt.LAST)
    assert state["step_mode"] == "cuda_graph" and len(state["history"]) == 2 and "val" in state["history"][-1]
    resumed = Trainer(tiny(**{**cfg.to_dict(), "compile": "off"}), prepared, run, init=stage1_ckpt, resume="auto")
    summary = resumed.fit()
    assert summary["steps"] == 3 * STEPS_PER_EPOCH and resumed.mode == "off"
    assert all(torch.isfinite(v).all() for v in resumed.module.state_dict().values() if v.is_floating_point())


def test_inductor_first_step_matches_eager_then_trains_and_resumes_eager(prepared, stage1_ckpt, tmp_path):
    """compile: inductor (opt-in): the compiled CNNs captured once; the first step's image instance loss equals
    eager's within rounding (same weights, same batch; the text terms depend on which negative the mining picks, and
    training amplifies rounding afterwards, docs/training.md); every step finite; the whole loop with validation runs
    and its checkpoint resumes in eager mode."""
    from torch._dynamo.utils import counters

    cfg = {**STAGE2, "dropout": 0.0, "lr_schedule": [[2, 1.0], [1, 0.1]], "log_every": 2}
    eager = Trainer(tiny(**cfg, compile="off"), prepared, tmp_path / "eager", init=stage1_ckpt)
    eager.model.train()
    batch = eager.batches[(0, 0)]
    batch.pop("key")
    eager.train_step(batch)
    ref = eager.step_values()
    eager.log.close()
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    run = tmp_path / "run"
    t = Trainer(tiny(**cfg, compile="inductor"), prepared, run, init=stage1_ckpt)
    assert t.mode == "inductor"
    seen = []
    real_step = t.train_step

    def step_then_stop(b):
        real_step(b)
        seen.append(t.step_values())
        if t.step == 2 * STEPS_PER_EPOCH + 1:
            t.stop_signal = 15
    t.train_step = step_then_stop
    assert t.fit()["stopped"] and isinstance(t.stepper.graph, step_mod.CudaGraph)
    assert counters["stats"]["unique_graphs"] - graphs >= 4  # image and text CNN, training and mining (eval) modes
    assert seen[0]["loss/instance_img"] == pytest.approx(ref["loss/instance_img"], rel=1e-3, abs=1e-4)
    assert all(math.isfinite(v) for s in seen for v in s.values())
    state = ckpt.load(run / ckpt.LAST)
    assert state["step_mode"] == "inductor" and "val" in state["history"][-1]
    resumed = Trainer(tiny(**cfg, compile="off"), prepared, run, init=stage1_ckpt, resume="auto")
    assert resumed.fit()["steps"] == 3 * STEPS_PER_EPOCH and resumed.mode == "off"


def test_breakdown_parts_replay_what_they_compute_eagerly(prepared, stage1_ckpt, tmp_path):
    """bench/step_breakdown.py times each part of the step captured in its own CUDA graph after the run's captured
    step: every part must capture there, and one replay must compute what the part computes eagerly (each path's
    gradients, the mining's chosen negatives, the SGD step's weights) from the same state."""
    import sys
    from pathlib import Path

    sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
    import step_breakdown  # bench/step_breakdown.py

    torch.backends.cudnn.deterministic = True
    try:
        t = Trainer(tiny(**{**STAGE2, "dropout": 0.0}, compile="cuda_graph"), prepared, tmp_path / "s2",
                    init=stage1_ckpt)
        batch = t.batches[0]
        for _ in range(step_mod.GRAPH_WARMUP + 2):  # the bench times the whole (captured) step first
            t.train_step(batch)
        assert t.stepper.graph is not None
        snap = step_breakdown.Snapshot(t)
        params = [p for p in t.module.parameters() if p.grad is not None]
        results: dict[str, torch.Tensor] = {}
        parts = step_breakdown.step_parts(t, batch, results)
        assert len(parts) == 6

        def outcome(name: str) -> list[torch.Tensor]:
            if name.startswith("mining: hardest"):
                return [results["idx"].clone()]
            if name.startswith("mining"):
                return [results["anchor" if "image" in name else "pool"].clone()]
            if name.startswith("optimizer"):
                return [p.detach().clone() for p in params]
            return [p.grad.clone() for p in params]

        def start() -> None:  # the snapshot; a backward part's gradients alone (it accumulates into them)
            snap.restore()
            if name.endswith("backward)"):
                for p in params:
                    p.grad.zero_()

        for name, fn in parts.items():
            start()
            fn()  # eager, from the snapshot
            want = outcome(name)
            replay = step_breakdown.graphed(fn, t.device)  # 3 warm-up calls, then the capture
            start()
            replay()
            torch.cuda.synchronize()
            for a, b in zip(want, outcome(name)):
                assert torch.equal(a, b) if not a.is_floating_point() else close(a, b) < 1e-4, name
        t.log.close()
    finally:
        torch.backends.cudnn.deterministic = False
