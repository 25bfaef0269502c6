"""utils.files (the one atomic write) and utils.vectors (the one L2 normalisation and top-k)."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from utils.cli import InvalidValue, resolve_device
from utils.files import atomic_dir, atomic_write, write_json
from utils.vectors import l2_normalize, top_indices, unit_rows


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------ files
def test_atomic_write_creates_parents_and_a_normal_file(tmp_path):
    path = tmp_path / "a" / "b" / "x.bin"
    with atomic_write(path) as f:
        f.write(b"abc")
        assert not path.exists()  # nothing at the final path before the block ends
    assert path.read_bytes() == b"abc" and os.listdir(path.parent) == ["x.bin"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's private 0o600


def test_atomic_write_failure_keeps_the_previous_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "x.json"
    write_json({"a": np.float32(1.5), "é": 1}, path)
    with pytest.raises(OSError, match="disk full"):
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write("half")
            raise OSError("disk full (simulated)")
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 1.5, "é": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "f").write_text("1")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "new").exists()  # the temporary directory and the parent it made are gone
    out.mkdir(parents=True)
    (out / "old").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("2")
        assert (out / "old").exists()
    assert sorted(os.listdir(out)) == ["f"] and os.listdir(out.parent) == ["out"]


# ------------------------------------------------------------------------------------------------ vectors
def test_l2_normalize_is_the_original_lrn():
    x = torch.tensor([[3.0, 4.0], [1e-5, 0.0], [0.0, 0.0]])
    y = l2_normalize(x)
    expected = x / torch.sqrt(1e-8 + (x * x).sum(1, keepdim=True))  # x / sqrt(1e-8 + ||x||^2), not x / ||x||
    assert torch.allclose(y, expected, rtol=1e-6) and y[1, 0] < 0.1 and torch.equal(y[2], torch.zeros(2))
    assert l2_normalize(x.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(unit_rows(x.numpy()), l2_normalize(x))  # numpy in, the same numbers out


def test_top_indices_best_first_ties_by_lower_index():
    s = np.array([0.5, 0.9, 0.5, 0.9, 0.1, 0.5])
    assert top_indices(s, 3).tolist() == [1, 3, 0]  # a tie at the 3rd place: the lower index wins
    assert top_indices(s, 4).tolist() == [1, 3, 0, 2]
    assert top_indices(torch.tensor(s), 10).tolist() == [1, 3, 0, 2, 5, 4]
    assert top_indices(s, 0).tolist() == [] and top_indices(np.zeros(0), 5).tolist() == []
    rng = np.random.default_rng(0)
    r = rng.integers(0, 5, 200).astype(np.float32)  # many ties
    for k in (1, 7, 50, 200):
        assert top_indices(r, k).tolist() == np.argsort(-r, kind="stable")[:k].tolist()


def test_resolve_device_is_the_one_device_rule():
    """auto follows the machine, cpu is always there, anything else than cpu / cuda / cuda:N is refused naming the
    flag, and cuda where there is none is refused (retrieval.search, retrieval.browse and the demo's backbone)."""
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu0", "cuda:x", "cuda:", ""):
        with pytest.raises(InvalidValue, match="--device .*expected auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(InvalidValue, match="CUDA is not available"):
                resolve_device(name)

