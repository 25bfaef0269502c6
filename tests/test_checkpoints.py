"""Checkpoints, resume, signals and non-finite losses of the training engine (engine/loop.py, checkpoint.py) on the
tiny synthetic dataset of tests/training_fixtures.py, on the CPU: checkpoints are complete, ``weights_only`` loadable
and atomic; a resume refuses a changed recipe but not a changed runtime key; a run SIGKILLed mid-epoch and resumed
ends with bit-identical weights to an uninterrupted run; SIGTERM writes a resumable checkpoint and exits 0; a stop at
an epoch's very end resumes silently; a NaN loss stops the run naming the step and the terms and keeps the last good
checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import engine.loop as loop
import engine.step as step_mod
from engine import checkpoint as ckpt
from engine.config import load_config
from engine.loop import NonFiniteLoss, Trainer
from tests.training_fixtures import (CLI_OVERRIDES, ROOT, STAGE2, STEPS_PER_EPOCH,  # noqa: F401 (fixtures)
                                     SUBPROCESS_ENV, one_thread, prepared, stage1, tiny)


def test_checkpoint_contents(stage1, prepared):
    state = torch.load(stage1["ckpt"], map_location="cpu", weights_only=True)  # loadable without pickle
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "batch", "step", "best", "config",
                "history", "complete"):
        assert key in state, key
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert (state["epoch"], state["batch"], state["step"], state["complete"]) == (1, 0, STEPS_PER_EPOCH, True)
    assert state["config"] == stage1["cfg"].to_dict()
    assert state["best"]["epoch"] == 1 and isinstance(state["best"]["rsum"], float)
    assert [h["epoch"] for h in state["history"]] == [1]
    trainer = stage1["trainer"]
    assert state["optimizer"]["state"], "no momentum buffers saved"
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == [g["name"] for g in
                                                                        trainer.optimizer.param_groups]
    assert state["scheduler"]["last_epoch"] == 1
    assert isinstance(state["scaler"], dict)
    for k, v in trainer.module.state_dict().items():
        assert torch.equal(state["model"][k], v), k
    # RNG state round trip
    ckpt.set_rng_state(state["rng"])
    again = ckpt.rng_state()
    assert torch.equal(again["torch"], state["rng"]["torch"])
    assert again["numpy"][1] == state["rng"]["numpy"][1]
    # config.yaml in the run directory = the resolved config
    assert yaml.safe_load((stage1["run"] / "config.yaml").read_text()) == stage1["cfg"].to_dict()
    assert json.loads((stage1["run"] / loop.DONE).read_text())["steps"] == STEPS_PER_EPOCH


def _broken_save(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 half a checkpoint")
    raise OSError("disk full (simulated)")


def test_save_atomic_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / ckpt.LAST
    ckpt.save_atomic({"step": 1, "w": torch.arange(4.0)}, path)
    monkeypatch.setattr(torch, "save", _broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"step": 2, "w": torch.zeros(4)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.LAST], "a temporary file was left behind"
    state = ckpt.load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(4.0))


def test_trainer_save_is_atomic(stage1, prepared, tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(stage1["cfg"], prepared, run, resume=str(stage1["ckpt"]))
    trainer.save()
    good = (run / ckpt.LAST).read_bytes()
    trainer.step += 1
    monkeypatch.setattr(torch, "save", _broken_save)
    with pytest.raises(OSError):
        trainer.save()
    monkeypatch.undo()
    assert (run / ckpt.LAST).read_bytes() == good
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert ckpt.load(run / ckpt.LAST)["step"] == STEPS_PER_EPOCH


def test_resume_refuses_changed_recipe_allows_runtime_keys(stage1, prepared, tmp_path):
    with pytest.raises(ValueError, match="dropout"):
        Trainer(tiny(dropout=0.3), prepared, tmp_path / "a", resume=str(stage1["ckpt"]))
    with pytest.raises(ValueError, match="lr_schedule"):
        Trainer(tiny(lr_schedule=[[2, 1.0]]), prepared, tmp_path / "b", resume=str(stage1["ckpt"]))
    t = Trainer(tiny(workers=1, log_every=7, eval_batch_size=4), prepared, tmp_path / "c",
                resume=str(stage1["ckpt"]))
    assert (t.epoch, t.step) == (1, STEPS_PER_EPOCH)
    with pytest.raises(FileNotFoundError):
        Trainer(tiny(), prepared, tmp_path / "d", resume=str(tmp_path / "nope.pt"))


def test_stage2_init_must_match_model_keys(stage1, prepared, tmp_path):
    with pytest.raises(ValueError, match="feature_dim"):
        Trainer(tiny(**STAGE2, feature_dim=32), prepared, tmp_path / "run", init=stage1["ckpt"])
    with pytest.raises(ValueError, match="init"):
        Trainer(tiny(**STAGE2), prepared, tmp_path / "run")


# ------------------------------------------------------------------------------------------------- NaN
def test_nan_loss_stops_and_keeps_last_good_checkpoint(prepared, tmp_path, monkeypatch):
    run = tmp_path / "run"
    path = run / ckpt.LAST
    real = step_mod.total_loss
    calls = []
    at_nan = {}

    def total_loss(out, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third step (global step index 2) goes non-finite
            at_nan["stat"] = path.stat()
            at_nan["bytes"] = path.read_bytes()
            out = dict(out, img_logits=out["img_logits"] * float("nan"))
        return real(out, *args, **kwargs)

    monkeypatch.setattr(step_mod, "total_loss", total_loss)
    trainer = Trainer(tiny(checkpoint_every_steps=1, dropout=0.5), prepared, run)
    with pytest.raises(NonFiniteLoss) as err:
        trainer.fit()
    msg = str(err.value)
    assert "step 2" in msg and "epoch 0" in msg and "batch 2" in msg, msg
    assert "instance_img=nan" in msg and "instance_txt=" in msg and "total=nan" in msg, msg
    assert len(calls) == 3
    st = path.stat()
    assert (st.st_ino, st.st_mtime_ns) == (at_nan["stat"].st_ino, at_nan["stat"].st_mtime_ns), \
        "checkpoint_last.pt was written after the non-finite loss"
    assert path.read_bytes() == at_nan["bytes"]
    state = ckpt.load(path)
    assert state["step"] == 2 and state["complete"] is False
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (run / loop.DONE).exists()


def test_nan_loss_cli_exit_code(prepared, tmp_path, monkeypatch, capsys):
    """The CLI reports a NonFiniteLoss as an error (exit 2), not a traceback."""
    from engine import train_cli

    real = step_mod.total_loss

    def total_loss(out, *args, **kwargs):
        return real(dict(out, txt_logits=out["txt_logits"] * float("inf")), *args, **kwargs)

    monkeypatch.setattr(step_mod, "total_loss", total_loss)
    rc = train_cli.main(1, ["--config", str(ROOT / "configs/demo.yaml"), "--data", str(prepared), "--out",
                            str(tmp_path / "run"), *cli_args(CLI_OVERRIDES)])
    assert rc == 2
    assert "non-finite loss at step 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- kill / signals
def cli_args(overrides: dict) -> list[str]:
    return [f"--{k}={json.dumps(v)}" for k, v in overrides.items()]


# train_stage1.py's main with a pause before every step (numerics untouched), so that a signal reliably lands in
# the middle of the run however fast the machine is.
SLOW_STAGE1 = ("import sys, time; import models; import engine.loop as L; from engine.train_cli import main; "
               "step = L.Trainer.train_step; "
               "L.Trainer.train_step = lambda self, b: (time.sleep(float(sys.argv[1])), step(self, b))[1]; "
               "sys.exit(main(1, sys.argv[2:]))")


def launch(prepared: Path, run: Path, log: Path, pause: float = 0.0, **extra) -> subprocess.Popen:
    args = ["--config", str(ROOT / "configs/demo.yaml"), "--data", str(prepared), "--out", str(run),
            *cli_args({**CLI_OVERRIDES, **extra})]
    if pause:
        cmd = [sys.executable, "-c", SLOW_STAGE1, str(pause), *args]
    else:
        cmd = [sys.executable, str(ROOT / "train_stage1.py"), *args]
    env = {**os.environ, **SUBPROCESS_ENV}
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> tuple[int, str, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return rc, log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()


def wait_for_checkpoint(proc: subprocess.Popen, path: Path, min_step: int, timeout: float = 240) -> dict:
    """Poll RUN_DIR/checkpoint_last.pt until it holds step >= min_step (cheap: mmap, read only on change)."""
    t0, last = time.time(), None
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited (rc {proc.returncode}) before step {min_step}")
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime is not None and mtime != last:
            last = mtime
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # noqa: BLE001 - replaced while opening: try again
                state = None
            if state is not None and state["step"] >= min_step:
                return {k: state[k] for k in ("epoch", "batch", "step")}
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint with step >= {min_step} within {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    """Stage I through the CLI, 2 epochs, a checkpoint after every step, never interrupted."""
    run = tmp_path_factory.mktemp("uninterrupted")
    rc, out, err = finish(launch(prepared, run / "run", run / "log"), run / "log")
    assert rc == 0, err
    state = ckpt.load(run / "run" / ckpt.LAST)
    assert state["complete"] and state["step"] == 2 * STEPS_PER_EPOCH
    return state


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    diff = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"
    for k, sa in a["optimizer"]["state"].items():
        for name, t in sa.items():
            assert torch.equal(t, b["optimizer"]["state"][k][name]), (k, name)
    assert (a["epoch"], a["batch"], a["step"]) == (b["epoch"], b["batch"], b["step"])
    assert a["history"] == b["history"] and a["best"] == b["best"]


def test_resume_after_sigkill_is_bit_identical(uninterrupted, prepared, tmp_path):
    run = tmp_path / "run"
    path = run / ckpt.LAST
    # killed in epoch 2 (after the epoch-1 validation), with a DataLoader worker process
    proc = launch(prepared, run, tmp_path / "killed", pause=0.3, workers=1)
    try:
        wait_for_checkpoint(proc, path, STEPS_PER_EPOCH + 1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its DataLoader worker (its own session)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = ckpt.load(path)
    assert killed["complete"] is False and killed["epoch"] == 1
    assert STEPS_PER_EPOCH < killed["step"] < 2 * STEPS_PER_EPOCH, "the run finished before it was killed"
    assert killed["best"]["epoch"] == 1 and [h["epoch"] for h in killed["history"]] == [1]
    # what a resume restores (in-process, no training): position, best and history are kept
    cfg = load_config(ROOT / "configs/demo.yaml", dict(CLI_OVERRIDES), stage=1)
    probe = Trainer(cfg, prepared, tmp_path / "probe", resume=str(path))
    assert (probe.epoch, probe.batch, probe.step) == (1, killed["batch"], killed["step"])
    assert probe.best == killed["best"] and probe.history == killed["history"]
    probe.log.close()
    # resume to the end (auto), with another worker count (a runtime key)
    rc, out, err = finish(launch(prepared, run, tmp_path / "resumed", workers=0), tmp_path / "resumed")
    assert rc == 0, err
    assert f"resumed from {path}: epoch 1, batch {killed['batch']}, step {killed['step']}" in err
    assert "loader workers: 0" in err  # the runtime key as this run uses it (the resolved number)
    final = ckpt.load(path)
    assert final["complete"] and final["epoch"] == 2 and final["step"] == 2 * STEPS_PER_EPOCH
    assert [h["epoch"] for h in final["history"]] == [1, 2]
    assert final["history"][0] == killed["history"][0]  # epoch 1's validation (done before the kill) is kept
    assert_same_training_state(uninterrupted, final)


def test_sigterm_checkpoints_exits_zero_and_resumes(uninterrupted, prepared, tmp_path):
    run = tmp_path / "run"
    path = run / ckpt.LAST
    proc = launch(prepared, run, tmp_path / "term", pause=0.3)
    try:
        wait_for_checkpoint(proc, path, 1)
        proc.send_signal(signal.SIGTERM)
        rc, out, err = finish(proc, tmp_path / "term")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, err
    assert "stopped by signal" in out and "SIGTERM" in err
    state = ckpt.load(path)
    assert state["complete"] is False
    assert state["epoch"] > 0 or state["batch"] > 0
    assert state["step"] < 2 * STEPS_PER_EPOCH
    assert not (run / loop.DONE).exists()
    # resume (in-process, same config as the CLI resolves) to the end: same weights as the uninterrupted run
    cfg = load_config(ROOT / "configs/demo.yaml", dict(CLI_OVERRIDES), stage=1)
    trainer = Trainer(cfg, prepared, run, resume="auto")
    assert trainer.step == state["step"]
    summary = trainer.fit()
    assert summary["steps"] == 2 * STEPS_PER_EPOCH
    final = ckpt.load(path)
    assert final["complete"]
    assert_same_training_state(uninterrupted, final)


def test_resume_at_the_very_end_of_an_epoch(prepared, tmp_path):
    """A stop after the last step of an epoch (before its end-of-epoch bookkeeping) resumes into an empty remainder:
    the LR schedule advances without an optimizer step. That must be silent and land on the uninterrupted state."""
    import signal
    import warnings

    cfg = tiny(lr_schedule=[[1, 1.0], [1, 0.1]], val_every=2)
    full = Trainer(cfg, prepared, tmp_path / "full")
    full.fit()
    t = Trainer(cfg, prepared, tmp_path / "run")
    real_step = t.train_step

    def step_then_stop(batch):
        real_step(batch)
        if t.step == STEPS_PER_EPOCH - 1:  # the epoch's last step (the counter moves after train_step)
            t.stop_signal = signal.SIGTERM

    t.train_step = step_then_stop
    assert t.fit()["stopped"]
    state = ckpt.load(tmp_path / "run" / ckpt.LAST)
    assert (state["epoch"], state["batch"]) == (0, STEPS_PER_EPOCH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch's "lr_scheduler.step() before optimizer.step()" included
        resumed = Trainer(cfg, prepared, tmp_path / "run", resume="auto")
        resumed.fit()
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in full.optimizer.param_groups]
    for (name, a), b in zip(full.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name
