"""The one training loop both stages use. The stage difference is data: which parameter groups train (Stage I:
backbone frozen), which losses and lambdas (config), and which batches (``TrainBatches`` stage 1 or 2).

Guarantees: full-state checkpoints written atomically every epoch (and every N steps); ``resume`` continues so
that a run killed at any moment ends with bit-identical weights on CPU; SIGTERM/SIGINT finish the step, write the
checkpoint and exit cleanly; a non-finite loss stops the run naming the step and the loss terms, and no checkpoint
is written after it (the last good one is kept); validation uses the val split only.

Speed: the step (``engine/step.py``) never waits on the device; values are read at ``log_every`` steps and before
checkpoints. One DataLoader iterator serves the whole run (``RunSampler``): workers start once, not per epoch.
"""
from __future__ import annotations

import json
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from utils.cli import InvalidValue, UserError
from models import DualPath, param_groups

from . import checkpoint as ckpt
from .config import Config, config_from_dict
from .data import Prepared, RunSampler, TrainBatches, TrainSpec, resolve_workers
from .dist import all_reduce_mean, all_reduce_min, barrier, global_batchnorm, init_distributed, is_main
from .encode import allow_tf32, encode_split
from .model_io import make_model
from .step import TrainStep, branch_runner, plain_lrs, resolve_mode
from .logging import RunLogger, retrieval_scalars
from .metrics import evaluate_retrieval
from .visualize import retrieval_figures

DONE = "train_done.json"
RUNTIME_KEYS = {"workers", "prefetch_factor", "log_every", "eval_batch_size", "checkpoint_every_steps",
                "val_every", "compile", "branch_streams"}  # may change on resume; everything else is the recipe


class NonFiniteLoss(UserError, RuntimeError):
    pass


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGINT: a scheduler signals the whole process group, and the main
    process must be able to finish its step and write the checkpoint (it shuts the workers down itself)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def validate(module: DualPath, data: Prepared, cfg: Config, device: torch.device, channels_last: bool = False
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Val-split retrieval metrics and the encoded features (spec 8.1 test-time features)."""
    feats = encode_split(module, data, "val", device, batch_size=cfg.eval_batch_size, precision=cfg.precision,
                         channels_last=channels_last)
    directions = ("t2i",) if data.manifest.get("match") == "person" else ("i2t", "t2i")
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in feats.items()}
    metrics = evaluate_retrieval(t["images"].to(device), t["texts"].to(device), t["image_labels"].to(device),
                                 t["text_labels"].to(device), directions=directions)
    return metrics, feats



class Trainer:
    def __init__(self, cfg: Config, data_dir: str | Path, run_dir: str | Path, *, init: str | Path | None = None,
                 resume: str | None = None, graph_factory: Any = None) -> None:
        """``graph_factory``: tests only (``engine.step.EmulatedGraph`` runs the captured mode's logic on CPU)."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.rank, self.world, local_rank = init_distributed()
        self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        cuda = self.device.type == "cuda"
        self.channels_last = cfg.channels_last and cuda
        if cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
            allow_tf32(self.device, cfg.precision)  # fp32 recipes: TF32 matmuls where the GPU has them
        self.mode = "cuda_graph" if graph_factory else resolve_mode(cfg.compile, self.device, self.world,
                                                                      cfg.precision)
        run_branches = branch_runner(cfg.branch_streams, self.device, self.world)
        self.log = RunLogger(self.run_dir, enabled=is_main())
        self.data = Prepared(data_dir)
        torch.manual_seed(cfg.seed)  # identical initialisation on every rank
        np.random.seed(cfg.seed)
        init_state = ckpt.load(init) if init else None
        if cfg.stage == 2 and init_state is None:
            raise InvalidValue("Stage II needs --init STAGE1_CHECKPOINT")
        try:
            self.module, self.pretrained_source = make_model(cfg, self.data, init_state)
        except (InvalidValue, RuntimeError) as e:  # the Stage I checkpoint does not fit this recipe (or is not one)
            if init_state is None:
                raise
            raise InvalidValue(f"--init {init}: {e}") from None
        self.module.to(self.device)
        if self.channels_last:
            self.module.image.to(memory_format=torch.channels_last)
        groups = param_groups(self.module, cfg.stage, cfg.base_lr, cfg.weight_decay,  # also freezes (Stage I)
                              backbone_bn=cfg.backbone_bn, lr_mults=cfg.lr_mults)
        # CUDA: the fused SGD kernel (a few launches per step, and it reads device LR tensors in a captured step)
        self.optimizer = torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                         fused=True if cuda else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cfg.lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16" and cuda)
        self.model: torch.nn.Module = self.module
        if self.world > 1:
            global_batchnorm(self.module)  # BN statistics over the global batch (SyncBatchNorm on NCCL)
            self.model = DDP(self.module, device_ids=[local_rank] if cuda else None)
        self.stepper = TrainStep(cfg, self.module, self.model, self.optimizer, self.scaler, self.device,
                                 self.channels_last, self.mode, graph_factory, run_branches)
        self.spec = TrainSpec(stage=2 if cfg.ranking_batches else 1, batch_size=cfg.batch_size, crop=cfg.train_crop,
                              seed=cfg.seed, position_shift=cfg.position_shift, negatives=cfg.negatives,
                              num_candidates=cfg.num_candidates, world_size=self.world, rank=self.rank,
                              last_batch=cfg.last_batch)
        self.batches = TrainBatches(self.data, self.spec)
        self.epoch, self.batch, self.step = 0, 0, 0
        self.best: dict[str, Any] = {"rsum": None, "epoch": None}
        self.history: list[dict[str, Any]] = []
        self.stop_signal: int | None = None
        self._iter: Any = None  # the run's one DataLoader iterator (``_loader``)
        if resume:
            self._resume(resume)

    # ------------------------------------------------------------------ checkpoints
    def _state(self, complete: bool = False) -> dict[str, Any]:
        optimizer, scheduler = self.optimizer.state_dict(), self.scheduler.state_dict()
        plain_lrs(optimizer, scheduler)  # the same checkpoint in every step mode
        return {"model": self.module.state_dict(), "optimizer": optimizer, "scheduler": scheduler,
                "scaler": self.scaler.state_dict(), "rng": ckpt.rng_state(), "epoch": self.epoch,
                "batch": self.batch, "step": self.step, "best": self.best, "history": self.history,
                "config": self.cfg.to_dict(), "stage": self.cfg.stage, "step_mode": self.mode,
                "pretrained_source": self.pretrained_source, "complete": complete,
                "data": {k: self.data.manifest.get(k) for k in ("dataset", "num_classes", "vocab_size", "max_len",
                                                                     "dictionary_sha256")}}

    def save(self, name: str = ckpt.LAST, complete: bool = False) -> None:
        self.check_finite()  # never a checkpoint after a non-finite step
        if is_main():
            ckpt.save_atomic(self._state(complete), self.run_dir / name)
        barrier()

    def _resume(self, resume: str) -> None:
        path = self.run_dir / ckpt.LAST if resume == "auto" else Path(resume)
        if not path.is_file():
            if resume == "auto":
                return  # nothing to resume: a fresh start
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        state = ckpt.load(path)
        old = config_from_dict(state["config"]).to_dict()
        changed = {k: (old[k], v) for k, v in self.cfg.to_dict().items() if old[k] != v and k not in RUNTIME_KEYS}
        if changed:
            raise InvalidValue(f"{path}: cannot resume with a different recipe; changed keys (old, new): {changed}")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.best, self.history = state["best"], state["history"]
        self.log.print(f"resumed from {path}: epoch {self.epoch}, batch {self.batch}, step {self.step}")

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: dict[str, torch.Tensor]) -> None:
        """One training step on a loader batch; no host sync (``step_values`` reads its values)."""
        self.stepper.run(batch)

    def step_values(self) -> dict[str, float]:
        """The last step's loss terms and accuracies (a host sync: for tests and tools, not the loop)."""
        return self.stepper.stats.last_values()

    def _mine(self, images: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``TrainStep.mine`` on a loader batch: (Yn tokens, Yn labels) for the anchors of ``images``."""
        return self.stepper.mine(images.to(self.device), batch["cand_tokens"].to(self.device),
                                 batch["cand_labels"].to(self.device))

    def check_finite(self) -> None:
        """Raise NonFiniteLoss naming the first non-finite step of this epoch and its terms (one host sync)."""
        bad = self.stepper.stats.first_non_finite()
        step = bad[0] if bad else -1
        if self.world > 1:  # the earliest over the ranks; every rank raises
            step = all_reduce_min(step if bad else 2 ** 62, self.device)
            step = -1 if step == 2 ** 62 else step
        if step < 0:
            return
        terms = (", ".join(f"{k}={v:.6g}" for k, v in bad[1].items()) if bad and bad[0] == step
                 else "non-finite on another rank")
        raise NonFiniteLoss(f"non-finite loss at step {step} (epoch {self.epoch}, batch "
                            f"{self.batch - (self.step - step)}): {terms}; the last good checkpoint "
                            f"({self.run_dir / ckpt.LAST}) is kept")

    # ------------------------------------------------------------------ epochs
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum
        self.log.print(f"signal {signal.Signals(signum).name}: finishing this step, then writing a checkpoint")

    def _stop_requested(self, at_log: bool) -> bool:
        """True on every rank once any rank got SIGTERM/SIGINT (all ranks must stop after the same step); with
        several ranks this needs a collective, so they agree at logging steps only."""
        if self.world == 1:
            return self.stop_signal is not None
        if not at_log:
            return False
        flag = torch.tensor(float(self.stop_signal is not None), device=self.device)
        return all_reduce_mean(flag).item() > 0

    def _loader(self) -> DataLoader:
        """The batches from (epoch, batch) to the end of the run."""
        kwargs: dict[str, Any] = {}
        workers = resolve_workers(self.cfg.workers, self.device)
        if workers > 0:
            kwargs = {"prefetch_factor": self.cfg.prefetch_factor, "worker_init_fn": _ignore_stop_signals}
        # A private generator: creating the loader must not consume the global torch RNG (dropout), or a resumed
        # run would diverge from an uninterrupted one.
        return DataLoader(self.batches, batch_size=None,
                          sampler=RunSampler(len(self.batches), self.cfg.epochs, self.epoch, self.batch),
                          num_workers=workers, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator(), **kwargs)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = iter(self._loader())
        batch = next(self._iter)
        key = batch.pop("key").tolist()
        if key != [self.epoch, self.batch]:
            raise RuntimeError(f"the loader delivered batch {key}, the trainer is at {[self.epoch, self.batch]}")
        return batch

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self.log.print("resolved config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
                           + f"step mode: {self.mode}\nloader workers: {resolve_workers(cfg.workers, self.device)}")
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.epoch < cfg.epochs:
                if not self._run_epoch():
                    return {"stopped": True, "epoch": self.epoch, "batch": self.batch, "step": self.step}
            self.save(ckpt.LAST, complete=True)
            summary = {"epochs": cfg.epochs, "steps": self.step, "best": self.best, "history": self.history}
            if is_main():
                (self.run_dir / DONE).write_text(json.dumps(summary, indent=1))
            return summary
        finally:
            self._iter = None  # shuts the loader's workers down
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.log.close()

    def _log_window(self, pairs: int, t_wait: float, t_start: float) -> tuple[dict[str, float], float]:
        """Read the window's values from the device (the one sync of the window), check them, write them."""
        values = self.stepper.stats.read_window()
        self.check_finite()
        now = time.perf_counter()
        elapsed = max(now - t_start, 1e-9)  # from the previous window's sync to this one: the device's time too
        values["perf/pairs_per_s"] = pairs / elapsed  # image-text pairs of the global batches
        values["perf/data_wait_fraction"] = t_wait / elapsed
        mining = self.stepper.mining_seconds()
        if mining is not None:
            values["perf/mining_fraction"] = mining / elapsed
        for g in self.optimizer.param_groups:
            values[f"lr/{g['name']}"] = float(g["lr"])
        self.log.scalars(values, self.step)
        return values, now

    def _run_epoch(self) -> bool:
        """One epoch (or its remainder after a resume). False when stopped by a signal."""
        cfg = self.cfg
        self.model.train()
        self.stepper.stats.set_step(self.step)
        bar = self.log.progress(len(self.batches), self.batch, f"stage {cfg.stage} epoch {self.epoch + 1}")
        t_wait, pairs = 0.0, 0
        t_start = time.perf_counter()
        while self.batch < len(self.batches):
            t0 = time.perf_counter()
            batch = self._next_batch()
            t_wait += time.perf_counter() - t0
            self.train_step(batch)
            pairs += self.batches.batch_size_of(self.batch)
            self.batch += 1
            self.step += 1
            bar.update(1)
            at_log = self.step % cfg.log_every == 0 or self.batch == len(self.batches)
            if at_log:
                values, t_start = self._log_window(pairs, t_wait, t_start)
                bar.set_postfix(loss=f"{values['loss/total']:.3f}", pairs_s=f"{values['perf/pairs_per_s']:.1f}")
                t_wait, pairs = 0.0, 0
            if self._stop_requested(at_log):
                bar.close()
                self.save(ckpt.LAST)
                self.log.print(f"checkpoint written at epoch {self.epoch}, batch {self.batch}; resume with "
                               f"--resume auto")
                return False
            if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0:
                self.save(ckpt.LAST)
        bar.close()
        self.check_finite()  # before validating: this epoch's steps were all finite
        self.epoch += 1
        self.batch = 0
        with warnings.catch_warnings():  # the LR is indexed by epoch: an epoch resumed at its very end (no step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()  # left) is correct, and PyTorch's order warning there is noise
        record: dict[str, Any] = {"epoch": self.epoch, "step": self.step}
        is_best = False
        if self.epoch % cfg.val_every == 0 or self.epoch == cfg.epochs:
            is_best = self._validate(record)
        self.history.append(record)
        self.save(ckpt.LAST)
        if is_best:
            self.save(ckpt.BEST)
        return True

    def _validate(self, record: dict[str, Any]) -> bool:
        """Val-split retrieval on rank 0 (the test split is never touched). True when rsum is a new best."""
        is_best = False
        if is_main() and len(self.data.split_images("val")):
            metrics, feats = validate(self.module, self.data, self.cfg, self.device, self.channels_last)
            record["val"] = metrics
            self.log.scalars(retrieval_scalars("val", metrics), self.step)
            for name, grid in retrieval_figures(feats, self.data, k=5).items():  # the same queries every time
                self.log.image(f"val/retrieval_{name}", grid, self.step)
            self.log.print(f"epoch {self.epoch}: val " + json.dumps(
                {d: {k: round(v, 2) for k, v in metrics[d].items()} for d in ("i2t", "t2i") if d in metrics})
                + f" rsum {metrics['rsum']:.2f}")
            if self.best["rsum"] is None or metrics["rsum"] > self.best["rsum"]:
                self.best = {"rsum": metrics["rsum"], "epoch": self.epoch}
                is_best = True
        barrier()
        if self.world > 1:  # only rank 0 validates, but every rank must agree: save(BEST) holds a barrier
            flag = torch.tensor([float(is_best)], device=self.device)
            torch.distributed.broadcast(flag, 0)
            is_best = bool(flag.item())
        return is_best
