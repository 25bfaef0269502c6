"""Helpers of the bench/ scripts whose numbers go into BENCHMARKS.md: they must do what their tables claim."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "bench") not in sys.path:
    sys.path.append(str(ROOT / "bench"))  # bench/ scripts import their neighbours by name
import graph_parity  # noqa: E402  (bench/graph_parity.py)
import step_breakdown  # noqa: E402  (bench/step_breakdown.py)


def test_perturb_is_a_rounding_sized_change_that_leaves_the_global_rng_alone():
    """--perturb REL multiplies each weight by (1 + REL n), n ~ N(0, 1): the per-tensor relative change is ~REL, every
    element moves, the same seed gives the same change, and dropout's global RNG stream is untouched."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256), torch.nn.Linear(256, 32))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    rel = 2.0 ** -20  # above fp32's rounding (2**-24), so the change survives the cast exactly enough to measure
    graph_parity.perturb(net, rel)
    assert torch.equal(torch.get_rng_state(), rng)
    after = net.state_dict()
    for name, _ in net.named_parameters():
        moved = before[name] != 0  # a zero weight (BatchNorm's bias at initialisation) stays zero
        if name == "1.bias":
            assert not moved.any() and torch.equal(after[name], before[name])
            continue
        ratio = (after[name].double() / before[name].double() - 1)[moved] / rel  # the drawn n, up to rounding
        assert 0.8 < ratio.std().item() < 1.2, name
        assert abs(ratio.mean().item()) < 0.3, name
        assert (after[name] != before[name])[moved].float().mean() > 0.9, name
    for name in ("1.running_mean", "1.running_var"):  # buffers are not weights: untouched
        assert torch.equal(after[name], before[name])
    again = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256), torch.nn.Linear(256, 32))
    again.load_state_dict(before)
    graph_parity.perturb(again, rel)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), after.values()))


def test_loader_throughput_runs_end_to_end_on_cpu(tmp_path):
    """bench/loader_throughput.py at its smoke settings (bench/run_all.sh SMOKE=1): in-process rate, a loader run, the
    device-side rows and the recommendation are all printed (its device-side timing once lacked its torch import)."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "loader_throughput.py"), "--train-images", "64",
                          "--image-size", "40", "--batches", "2", "--inprocess", "1", "--workers", "1",
                          "--prefetch", "2", "--model-rate", "none", "--no-write", "--cache", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "in-process:" in out.stdout and "workers 1 pin False persistent False prefetch 4" in out.stdout
    assert "input normalisation on cpu" in out.stdout


def test_gpu_check_runs_parts_in_order_and_keeps_the_demo_alone(tmp_path):
    """bench/gpu_check.sh, dry-run on a copy of itself with a stand-in python and demo that record their calls: the
    parts run in the order given, inductor's gradient check first; a leading demo runs before the shared synthetic
    set is built (nothing else on the CPUs), while `all` builds it at once; a failing part makes the exit status 1."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "scripts").mkdir()
    (tmp_path / "bench" / "gpu_check.sh").write_text((ROOT / "bench" / "gpu_check.sh").read_text())
    (tmp_path / "BENCHMARKS.md").write_text("# Benchmarks\n")
    calls = tmp_path / "calls.log"
    fake = tmp_path / "fakepy"
    fake.write_text(f'#!/bin/bash\n[[ "$*" != *synthetic_prepared* ]] || sleep 0.5  # a build that takes time\n'
                    f'echo "PY $*" >> {calls}\n[ -z "$FAIL" ] || [[ "$*" != *$FAIL* ]]\n')
    fake.chmod(0o755)
    (tmp_path / "scripts" / "demo.sh").write_text(f'echo "DEMO $*" >> {calls}\n')

    def check(*parts: str, fail: str = "") -> tuple[int, list[str]]:
        calls.unlink(missing_ok=True)
        r = subprocess.run(["bash", "bench/gpu_check.sh", *parts, "--out", str(tmp_path / "out")], cwd=tmp_path,
                           env={**os.environ, "PYTHON": str(fake), "FAIL": fail}, capture_output=True, text=True,
                           timeout=60)
        names = []
        for line in calls.read_text().splitlines()[1:]:  # [0]: the CUDA probe
            words = line.split()
            names.append("data" if "synthetic_prepared" in line else "demo" if words[0] == "DEMO" else
                         " ".join(w for w in words[1:3] if not w.startswith("-")) +
                         (" whole" if "whole" in line else " one-step" if "--one-step" in line else ""))
        return r.returncode, names

    rc, names = check("demo", "inductor")
    assert rc == 0
    assert names == ["demo", "data", "bench/graph_parity.py one-step", "bench/train_throughput.py",
                     "bench/graph_parity.py", "pytest", "bench/graph_parity.py whole"], names
    rc, names = check()  # all: the build starts at once, in the background (beside the CUDA tests)
    assert rc == 0 and names[0] in ("data", "pytest") and names[-1] == "demo"  # the CUDA tests need no data
    assert names.index("data") < names.index("bench/graph_parity.py")  # waited for before the first use
    assert names.count("bench/train_throughput.py") == 10
    assert names.index("bench/train_throughput.py") < names.index("bench/step_breakdown.py") < names.index("demo")
    rc, names = check("streams")  # the layout bench and the CUDA tests need no data; then speed and parity
    assert rc == 0 and sorted(names[:3]) == ["bench/text_layout.py", "data", "pytest"], names
    assert names.index("bench/text_layout.py") < names.index("pytest")
    assert names[3:] == ["bench/train_throughput.py", "bench/train_throughput.py", "bench/graph_parity.py"], names
    lines = calls.read_text()
    assert "-k branch_streams" in lines and "--branch-streams off on" in lines and "--branch-streams --output" in lines
    assert "--compile inductor --branch-streams on" in lines
    rc, names = check("speed", fail="bf16")
    assert rc == 1 and names.count("bench/train_throughput.py") == 4  # the other parts still ran


def test_step_breakdown_parts_compute_what_they_name(tmp_path):
    """bench/step_breakdown.py times the step's parts one by one; each must be the computation its row names. On a
    tiny Stage II Trainer: the image path gives gradients to the image CNN and the shared W only, the text path to
    the text CNN and W only; the mining forwards create no gradient, leave the module in train mode and pick the
    same negatives as the step's own mining; the optimizer part moves the weights; a Snapshot restores weights,
    BatchNorm statistics, gradients and momentum exactly; 'rest' is the whole minus the parts."""
    from engine.loop import Trainer
    from tests.training_fixtures import STAGE2, make_prepared, tiny

    prepared = make_prepared(tmp_path / "data")
    t1 = Trainer(tiny(), prepared, tmp_path / "s1")
    t1.save()
    t = Trainer(tiny(**{**STAGE2, "dropout": 0.0}), prepared, tmp_path / "s2",
                init=tmp_path / "s1" / "checkpoint_last.pt")
    batch = t.batches[0]
    t.train_step(batch)  # gradients and momentum exist, as after the bench's whole-step timing
    results: dict[str, torch.Tensor] = {}
    parts = step_breakdown.step_parts(t, batch, results)  # the argmax's inputs: the mining forwards, now
    mined_tokens, _ = t._mine(t.module.image.normalize(batch["images"]), batch)  # the step's mining, same state
    names = list(parts)
    assert [n.split(" ")[0] for n in names] == ["image", "text", "mining:", "mining:", "mining:", "optimizer"], names
    params = dict(t.module.named_parameters())

    def grads_after(part: str) -> set[str]:
        t.module.zero_grad(set_to_none=True)
        parts[part]()
        return {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}

    trainable = {n for n, p in params.items() if p.requires_grad}
    image = grads_after(names[0])
    assert image == {n for n in trainable if n.startswith(("image.", "classifier."))}
    text = grads_after(names[1])
    # text.embed_bias: the BatchNorm right after it cancels its gradient to rounding (BENCHMARKS section 11)
    assert text - {"text.embed_bias"} == {n for n in trainable if n.startswith(("text.", "classifier."))
                                          and n != "text.embed_bias"}
    for name in names[2:5]:
        assert grads_after(name) == set() and t.module.training, name
    parts[names[4]]()
    assert torch.equal(batch["cand_tokens"][results["idx"]], mined_tokens)

    grads_after(names[0]), grads_after(names[1])  # gradients of the whole path again
    snap = step_breakdown.Snapshot(t)
    before = {k: v.clone() for k, v in t.module.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    momentum = [v.clone() for st in t.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    parts[names[0]](), parts[names[-1]]()
    after = t.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))  # SGD moved weights
    snap.restore()
    assert all(torch.equal(before[k], v) for k, v in t.module.state_dict().items())
    assert all(torch.equal(grads[n], params[n].grad) for n in grads)
    assert all(torch.equal(a, b) for a, b in zip(
        momentum, [v for st in t.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]))

    rows = step_breakdown.rows_of(2, "fp32", 32, [("whole step (cuda_graph)", 0.010), ("a", 0.004), ("b", 0.003)])
    assert rows[0][3:] == ["10.00", "100 %", "3200"] and rows[1][3:] == ["4.00", "40 %", "8000"]
    assert rows[-1][2:5] == ["rest (whole - parts)", "3.00", "30 %"]
