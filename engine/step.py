"""One training step without a host sync, run eagerly or captured once as a CUDA graph and replayed (spec 6.3, 7.5).

The step: uint8 images -> normalised input; Stage II (hard): mine the hardest of the candidate captions in eval mode
(spec 7.5 steps 2-4); forward; J (spec 6.3); backward; SGD. Nothing in it reads a value back to the host: the loss
terms, the instance accuracies and the finiteness of J are accumulated on the device (``StepStats``) and read only
when the loop logs or checkpoints. A non-finite J is remembered with its step and terms; the loop raises before any
checkpoint is written (the last good one is kept), at most ``log_every`` steps later.

Modes (config key ``compile``, resolved by ``resolve_mode``):

* ``off`` (eager): the step as Python runs it, kernel by kernel. CPU, DDP, fp16 (its loss scaler syncs).
* ``cuda_graph``: the whole step (mining, forward, losses, backward, optimizer step, the statistics) is captured
  once into a CUDA graph after ``GRAPH_WARMUP`` eager steps (real training steps, on a side stream as PyTorch
  requires) and replayed from then on: one launch per step. Inputs are copied into static buffers (non-blocking,
  from the loader's pinned memory); the graph is for the full batch's shapes: an epoch's smaller last batch
  (``last_batch: keep``, one step in 931 for Flickr30k) runs eagerly, on the same parameters, optimizer state and
  statistics (with ``inductor`` its compiled modules compile that shape once). The learning rates become device
  tensors read by the fused SGD kernel, so the LR schedule changes them without a re-capture; dropout draws from
  the CUDA generator, which graph replays advance like eager steps; the position shift and crops are drawn in the
  loader, outside the graph.

* ``inductor`` (opt-in, measured faster, not yet the default): ``cuda_graph`` with the image CNN and the text
  CNN's blocks compiled in place by ``torch.compile`` (``compile_cnns``): their training forward and backward and
  the mining's eval-mode forward become fused inductor kernels, compiled in the first warm-up steps and captured
  with the rest of the step. Fused kernels round differently from eager ones, so its training is not identical to
  eager's; fp32 only (bf16 gave a non-finite loss at step 1). docs/training.md: the measurements, what is open.

``branch_streams: true`` (opt-in, any mode, one CUDA process; ``BranchStreams``) runs the image and the text path on
two CUDA streams of their own: the training forward (autograd then runs each backward op on its forward op's
stream, so the two backward passes overlap too) and the mining's two forwards. At the paper's batch of 32 neither
path fills an H200, and until W the two are independent. The kernels and the order of the random draws are
unchanged, so the step computes what it computes on one stream.

CPU tests run the capture logic with ``EmulatedGraph`` (capture records the function, replay re-runs it), which
checks the static-buffer plumbing, the LR tensors and the device statistics; the real capture needs CUDA.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from models import BranchRunner, hardest_negatives, one_after_another, top1_accuracy, total_loss
from models.dual_path import Branch
from utils.cli import UserError

from .config import Config
from .encode import autocast

MODES = ("auto", "off", "cuda_graph", "inductor")
CAPTURED = ("cuda_graph", "inductor")  # the modes that capture the step
COMPILE_BACKEND = "inductor"  # torch.compile's backend for compile: inductor (tests trace with "eager" on CPU)
GRAPH_WARMUP = 3  # eager steps before the capture (cuDNN autotuning, lazy buffers, momentum buffers)
INPUTS = ("images", "tokens", "labels", "text_labels", "cand_tokens", "cand_labels")


def resolve_mode(requested: str, device: torch.device, world: int, precision: str) -> str:
    """The concrete step mode: ``auto`` is ``cuda_graph`` on one CUDA process outside fp16, else ``off``.
    Asking for a captured mode where it cannot run is a user error naming the reason."""
    if requested not in MODES:
        raise UserError(f"compile must be one of {list(MODES)}, got {requested!r}")
    why = ("it needs a CUDA device" if device.type != "cuda" else
           "it is single-process only (under torchrun each step all-reduces through DDP)" if world > 1 else
           "fp16's loss scaler reads its overflow check on the host" if precision == "fp16" else None)
    if requested == "auto":
        return "off" if why else "cuda_graph"
    if requested == "inductor" and why is None and precision != "fp32":
        why = (f"it runs in fp32 only (precision: {precision}; under bf16 autocast, inductor with the whole text CNN "
               f"gave a non-finite text loss at step 1 on an H200; this scope is unmeasured there)")
    if requested in CAPTURED and why:
        raise UserError(f"compile: {requested} is not available here: {why}; use compile: auto or off")
    return requested


class BranchStreams:
    """``branch_streams: true``: each path of a ``DualPath.forward`` (or of the mining) on a CUDA stream of its own,
    forked from the current stream and joined back into it before the results are used. Tensors that cross streams
    are marked with ``record_stream``, so the caching allocator does not hand their memory out while the other
    stream may still read it. Graph-safe: under capture the fork and the join become the graph's edges."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))

    def __call__(self, branches: list[Branch]) -> list[dict[str, torch.Tensor]]:
        if len(branches) > len(self.streams):
            raise ValueError(f"{len(branches)} branches for {len(self.streams)} streams")
        main = torch.cuda.current_stream(self.device)
        outs = []
        for stream, (fn, args) in zip(self.streams, branches):  # launched in order: the same random draws
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                for a in args:
                    a.record_stream(stream)
                outs.append(fn(*args))
        for stream, out in zip(self.streams, outs):
            main.wait_stream(stream)
            for t in out.values():
                t.record_stream(main)
        return outs

    def join(self) -> None:
        """The current stream waits for all work on the branch streams: after the backward, whose ops ran there
        too (autograd already syncs the gradients it hands back; this also makes sure that a capture ends with no
        work left unjoined on a side stream)."""
        main = torch.cuda.current_stream(self.device)
        for stream in self.streams:
            main.wait_stream(stream)


def branch_runner(enabled: bool, device: torch.device, world: int) -> BranchRunner:
    """``branch_streams``: the runner of the two paths; asking for streams where they cannot run is a user error."""
    if not enabled:
        return one_after_another
    why = ("it needs a CUDA device" if device.type != "cuda" else
           "it is single-process only (under torchrun DDP's gradient hooks are not set up for it)" if world > 1
           else None)
    if why:
        raise UserError(f"branch_streams: true is not available here: {why}; use branch_streams: false")
    return BranchStreams(device)


def compile_cnns(module: nn.Module, backend: str | None = None) -> None:
    """``compile: inductor``: the image CNN and the text CNN's residual blocks compiled in place
    (``nn.Module.compile``, static shapes); the text CNN's word embedding, its bias and their BatchNorm stay eager.
    Why not the whole text CNN: on CPU (torch 2.13, 2026-12-04) inductor then got the word embedding's gradient
    wrong (136 % relative error against float64, eager fp32: 1.6 %), and the five layers embedding + bias +
    BatchNorm + conv + max compiled alone corrupted the heap; with the embedding eager, every gradient is as close
    to float64 as eager's (tests/test_step.py). Parameter names, hence checkpoints, are unchanged. Only calls of the
    compiled modules are compiled (the training forward, the mining's eval-mode forward); the test-time features of
    spec 8.1 (``ImageCNN.test_feature``, ``TextCNN.test_feature``: a new shape per batch) run eagerly."""
    import torch._dynamo

    # training, the mining's eval mode and Stage I's frozen backbone each compile a variant
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    for m in (module.image, module.text.blocks):
        m.compile(backend=backend or COMPILE_BACKEND, dynamic=False)


class StepStats:
    """Device-side values of the training steps: the last step's, their sums over the logging window, and the first
    non-finite J (its global step and the terms of that step). Every update is an in-place tensor op (graph-safe)."""

    def __init__(self, names: list[str], device: torch.device, step: int = 0) -> None:
        self.names = names
        self.total = names.index("loss/total")
        k = len(names)
        self.last = torch.zeros(k, dtype=torch.float64, device=device)
        self.sums = torch.zeros(k, dtype=torch.float64, device=device)
        self.bad_values = torch.zeros(k, dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.step = torch.full((), step, dtype=torch.int64, device=device)  # global step of the next record
        self.count = 0  # host-side: steps recorded since the last ``read_window``

    def record(self, values: torch.Tensor) -> None:
        """values (K,) in ``names`` order, on the device."""
        v = values.double()
        self.last.copy_(v)
        self.sums.add_(v)
        new = ~torch.isfinite(v[self.total]) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(new, self.step, self.first_bad))
        self.bad_values.copy_(torch.where(new, v, self.bad_values))
        self.step.add_(1)

    def set_step(self, step: int) -> None:
        self.step.fill_(step)

    def last_values(self) -> dict[str, float]:
        return dict(zip(self.names, self.last.tolist()))  # one sync

    def read_window(self) -> dict[str, float]:
        """Means over the steps since the last call (one sync), then a new window."""
        n, sums = max(self.count, 1), self.sums.tolist()
        self.sums.zero_()
        self.count = 0
        return {k: s / n for k, s in zip(self.names, sums)}

    def first_non_finite(self) -> tuple[int, dict[str, float]] | None:
        """(global step, loss terms at that step) of the first non-finite J, or None (one sync)."""
        step = int(self.first_bad.item())
        if step < 0:
            return None
        terms = {k.split("/", 1)[1]: v for k, v in zip(self.names, self.bad_values.tolist()) if k.startswith("loss/")}
        return step, terms


class EmulatedGraph:
    """CPU stand-in for ``torch.cuda.CUDAGraph`` in tests: ``capture`` records the function without running it,
    ``replay`` runs it again on the same static tensors."""

    def capture(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()


class CudaGraph:
    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], None]) -> None:
        # thread_local: the DataLoader's pin-memory thread keeps calling CUDA (host allocations, event queries)
        # while this thread captures; only this thread's calls must be capture-safe
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            fn()

    def replay(self) -> None:
        self.graph.replay()


class TrainStep:
    """The training step of a Trainer: ``run(batch)`` takes the loader's (pinned, CPU) batch and trains on it
    without a host sync. ``model`` is what the forward calls (the module, or its DDP wrapper)."""

    def __init__(self, cfg: Config, module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, device: torch.device, channels_last: bool, mode: str,
                 graph_factory: Callable[[], Any] | None = None,
                 run_branches: BranchRunner = one_after_another) -> None:
        self.run_branches = run_branches
        self.cfg, self.module, self.model, self.optimizer, self.scaler = cfg, module, model, optimizer, scaler
        self.device, self.channels_last, self.mode = device, channels_last, mode
        self.mining = cfg.ranking_batches and cfg.negatives == "hard"
        self.lambda_rank = cfg.lambda_rank  # Stage I: 0 (> 0: the "only ranking loss" ablation, Stage II's batches)
        names = ["loss/instance_img", "loss/instance_txt"] + (["loss/rank"] if self.lambda_rank else [])
        self.stats = StepStats(names + ["loss/total", "acc/img_top1", "acc/txt_top1"], device)
        self.graph_factory = graph_factory or (CudaGraph if device.type == "cuda" else EmulatedGraph)
        if mode == "inductor":
            compile_cnns(module)
        self.graph: Any = None
        self.static: dict[str, torch.Tensor] | None = None
        self.warm = 0
        self.capturing = False
        self.mining_time: list[Any] = []  # eager only: (start, end) CUDA events or seconds, per step of the window
        # device LR tensors: needed by the captured step; on CUDA also eager, so both run the same fused-SGD math
        self.tensor_lr = device.type == "cuda" or mode in CAPTURED

    # ------------------------------------------------------------------ the step's computation
    def mine(self, images: torch.Tensor, cand_tokens: torch.Tensor, cand_labels: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Spec 7.5 steps 2-4: in eval mode, without gradients, the hardest of the candidate captions for each
        anchor image (the first half of ``images``). The model is put back in train mode afterwards."""
        h = images.shape[0] // 2
        self.module.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.cfg.precision, cache=not self.capturing):
                anchor, pool = self.run_branches([(self.module.image, (images[:h],)),
                                                  (self.module.text, (cand_tokens,))])
            anchor, pool = anchor["rank"], pool["rank"]  # (h, 2048), (P, 2048) post-ReLU
            idx = hardest_negatives(anchor, pool)  # (h,)
        finally:
            self.module.train()
        return cand_tokens[idx], cand_labels[idx]

    def _timed_mine(self, images: torch.Tensor, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode != "off":  # inside the graph (or its warm-up): not separable
            return self.mine(images, x["cand_tokens"], x["cand_labels"])
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.mine(images, x["cand_tokens"], x["cand_labels"])
            end.record()
            self.mining_time.append((start, end))
            return out
        t0 = time.perf_counter()
        out = self.mine(images, x["cand_tokens"], x["cand_labels"])
        self.mining_time.append(time.perf_counter() - t0)
        return out

    def compute(self, x: dict[str, torch.Tensor]) -> None:
        """One step on device tensors ``x`` (uint8 images, tokens, labels, text labels, candidates)."""
        cfg = self.cfg
        images = self.module.image.normalize(x["images"], self.channels_last)  # (B, 3, H, W) float
        tokens, labels, text_labels = x["tokens"], x["labels"], x["text_labels"]
        if self.mining:
            h = images.shape[0] // 2
            neg_tokens, neg_labels = self._timed_mine(images, x)
            tokens, text_labels = tokens.clone(), text_labels.clone()
            tokens[h:], text_labels[h:] = neg_tokens, neg_labels
        with autocast(self.device, cfg.precision, cache=not self.capturing):
            out = self.model(images, tokens, run_branches=self.run_branches)
        loss, terms = total_loss(out, labels, text_labels, lambda_rank=self.lambda_rank, lambda_img=cfg.lambda_img,
                                 lambda_txt=cfg.lambda_txt, margin=cfg.margin, ranking=cfg.ranking_loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if isinstance(self.run_branches, BranchStreams):
            self.run_branches.join()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        accs = [top1_accuracy(out["img_logits"], labels), top1_accuracy(out["txt_logits"], text_labels)]
        self.stats.record(torch.stack([terms[k.split("/", 1)[1]].float() for k in self.stats.names[:-2]] + accs))

    # ------------------------------------------------------------------ eager or replayed
    def run(self, batch: dict[str, torch.Tensor]) -> None:
        """Train on one batch: the loader's (CPU tensors, pinned on CUDA) or one already on the device."""
        self.stats.count += 1
        if self.tensor_lr and not isinstance(self.optimizer.param_groups[0]["lr"], torch.Tensor):
            lr_tensors(self.optimizer, self.device)  # again after a resume loaded float LRs
        if self.mode == "off" or batch["labels"].shape[0] != self.cfg.batch_size:  # (captured: one process)
            self.compute({k: batch[k].to(self.device, non_blocking=True) for k in INPUTS if k in batch})
            if self.mode != "off":  # an epoch's smaller last batch: its gradients are not the graph's, free them
                self.optimizer.zero_grad(set_to_none=True)
            return
        self._fill_static(batch)
        if self.graph is None:
            if self.warm < GRAPH_WARMUP:
                self.warm += 1
                self._side_stream(lambda: self.compute(self.static))
                return
            self._capture()
        self.graph.replay()

    def _fill_static(self, batch: dict[str, torch.Tensor]) -> None:
        if self.static is None:
            self.static = {k: torch.empty(batch[k].shape, dtype=batch[k].dtype, device=self.device)
                           for k in INPUTS if k in batch}
        for k, buf in self.static.items():
            if batch[k].shape != buf.shape:
                raise RuntimeError(f"compile: {self.mode} needs every batch of a run to have the same shapes; "
                                   f"{k} is {tuple(batch[k].shape)}, the captured step has {tuple(buf.shape)}")
            buf.copy_(batch[k], non_blocking=True)

    def _side_stream(self, fn: Callable[[], None]) -> None:
        if self.device.type != "cuda":
            fn()
            return
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _capture(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients in its pool
        graph = self.graph_factory()
        self.capturing = True
        try:
            graph.capture(lambda: self.compute(self.static))
        except Exception as e:
            raise RuntimeError(f"capturing the training step as a CUDA graph failed ({type(e).__name__}: {e}); "
                               f"--compile off trains without it") from e
        finally:
            self.capturing = False
        self.graph = graph

    def mining_seconds(self) -> float | None:
        """Mining time of the steps since the last call (eager only; reads CUDA events: call after a sync)."""
        if not self.mining or self.mode != "off":
            return None
        times, self.mining_time = self.mining_time, []
        return sum(t if isinstance(t, float) else t[0].elapsed_time(t[1]) / 1000 for t in times)


def lr_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Each group's LR as a 0-d device tensor (float32 on CUDA, read by the fused SGD kernel; float64 on CPU, so
    that the emulated graph updates exactly like the eager step). The scheduler then fills these tensors in
    place: the captured step sees every LR change without a re-capture."""
    dtype = torch.float32 if device.type == "cuda" else torch.float64
    for g in optimizer.param_groups:
        if not isinstance(g["lr"], torch.Tensor):
            g["lr"] = torch.tensor(float(g["lr"]), dtype=dtype, device=device)


def plain_lrs(optimizer_state: dict[str, Any], scheduler_state: dict[str, Any]) -> None:
    """LR tensors (captured mode) back to floats in state dicts, in place: a checkpoint is the same in every mode."""
    for g in optimizer_state["param_groups"]:
        g["lr"] = float(g["lr"])
    if "_last_lr" in scheduler_state:
        scheduler_state["_last_lr"] = [float(x) for x in scheduler_state["_last_lr"]]
