"""evaluate.py end to end: the npz entry point, --coco-1k and --folds, a checkpoint on a prepared split with --visualize and
--compare-paper, and --table. Reuses the tiny hand-written prepared directory and checkpoint of
test_visualize_search.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from engine.data import Prepared
from engine.encode import encode_split
from engine.metrics import evaluate_retrieval
from engine.model_io import load_model
from tests.test_visualize_search import checkpoint, data, model, prepared  # noqa: F401  (shared fixtures)

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def planted(n_img: int, caps: list[int], seed: int = 0, noise: float = 0.5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n_img, 16)).astype(np.float32)
    owner = np.repeat(np.arange(n_img), caps)
    texts = images[owner] + noise * rng.normal(size=(len(owner), 16)).astype(np.float32)
    return {"images": images, "texts": texts, "image_labels": np.arange(n_img), "text_labels": owner}


def test_npz_entry_point_matches_the_metric_core(tmp_path):
    feats = planted(20, [5] * 20)
    np.savez(tmp_path / "f.npz", **feats)
    proc = run("--embeddings", str(tmp_path / "f.npz"), "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "r.json").read_text())
    want = evaluate_retrieval(*(torch.from_numpy(feats[k]) for k in ("images", "texts", "image_labels",
                                                                     "text_labels")))
    for d in ("i2t", "t2i"):
        assert set(got[d]) >= {"R@1", "R@5", "R@10", "medr", "meanr"}
        for k in ("R@1", "R@5", "R@10", "medr", "meanr"):
            assert got[d][k] == pytest.approx(want[d][k])
    assert got["rsum"] == pytest.approx(sum(got[d][k] for d in ("i2t", "t2i") for k in ("R@1", "R@5", "R@10")))
    assert got["num_images"] == 20 and got["num_texts"] == 100


def test_npz_perfect_embeddings_and_missing_arrays(tmp_path):
    feats = planted(10, [5] * 10, noise=0.0)
    np.savez(tmp_path / "f.npz", **feats)
    proc = run("--embeddings", str(tmp_path / "f.npz"), "--out", str(tmp_path / "r.json"))
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["i2t"]["R@1"] == 100.0 and got["t2i"]["R@1"] == 100.0 and got["t2i"]["medr"] == 1
    np.savez(tmp_path / "bad.npz", images=feats["images"])
    proc = run("--embeddings", str(tmp_path / "bad.npz"))
    assert proc.returncode == 2 and "missing arrays" in proc.stderr and "text_labels" in proc.stderr


def test_npz_coco_1k_folds(tmp_path):
    rng = np.random.default_rng(1)
    feats = planted(10, list(rng.integers(5, 8, size=10)), seed=1)  # COCO-like 5-7 captions per image
    np.savez(tmp_path / "f.npz", **feats)
    proc = run("--embeddings", str(tmp_path / "f.npz"), "--coco-1k", "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "r.json").read_text())
    assert len(got["folds"]) == 5
    for d in ("i2t", "t2i"):  # the reported numbers are the means of the five folds
        assert got[d]["R@1"] == pytest.approx(np.mean([f[d]["R@1"] for f in got["folds"]]))
    # each fold only holds its own 2 images and their captions
    first = evaluate_retrieval(torch.from_numpy(feats["images"][:2]),
                               torch.from_numpy(feats["texts"][np.isin(feats["text_labels"], [0, 1])]),
                               torch.tensor([0, 1]), torch.from_numpy(feats["text_labels"][np.isin(
                                   feats["text_labels"], [0, 1])]))
    assert got["folds"][0]["i2t"]["R@1"] == pytest.approx(first["i2t"]["R@1"])


def test_npz_folds_are_means_of_consecutive_folds_and_the_table_gives_one_folds_chance(tmp_path):
    feats = planted(12, [5] * 12, seed=3, noise=1.2)  # noisy enough that the folds differ from the whole set
    np.savez(tmp_path / "f.npz", **feats)
    proc = run("--embeddings", str(tmp_path / "f.npz"), "--folds", "3", "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["protocol"] == "embeddings-12img-test-3fold"
    assert len(got["folds"]) == 3
    t = {k: torch.from_numpy(v) for k, v in feats.items()}
    for f in range(3):  # fold f = images 4f..4f+3 and only their captions, scored by the metric core
        img = slice(4 * f, 4 * f + 4)
        keep = (t["text_labels"] >= 4 * f) & (t["text_labels"] < 4 * f + 4)
        want = evaluate_retrieval(t["images"][img], t["texts"][keep], t["image_labels"][img], t["text_labels"][keep])
        assert got["folds"][f]["rsum"] == pytest.approx(want["rsum"])
    assert got["rsum"] == pytest.approx(np.mean([f["rsum"] for f in got["folds"]]))
    whole = evaluate_retrieval(*(t[k] for k in ("images", "texts", "image_labels", "text_labels")))
    assert got["rsum"] != pytest.approx(whole["rsum"])
    # the chance row of a fold-averaged result is that of one fold (4 images, 5 captions each), not of 12 images
    table = run("--table", str(tmp_path / "r.json"))
    chance = [line for line in table.stdout.splitlines() if line.startswith("| chance")]
    assert len(chance) == 1 and chance[0].startswith("| chance (4 images, 5 captions each) | 25.0 |"), table.stdout


@pytest.mark.parametrize("args,message", [
    (["--folds", "1"], "--folds 1: expected an integer >= 2"),
    (["--folds", "5"], "12 images cannot be cut into 5 equal folds"),
    (["--folds", "3", "--coco-1k"], "not allowed with argument"),
])
def test_bad_folds_are_one_line_errors(tmp_path, args, message):
    np.savez(tmp_path / "f.npz", **planted(12, [5] * 12))
    proc = run("--embeddings", str(tmp_path / "f.npz"), *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_checkpoint_evaluation_visualize_compare_and_table(checkpoint, prepared, tmp_path):  # noqa: F811
    out = tmp_path / "res" / "results.json"
    proc = run("--checkpoint", str(checkpoint), "--data", str(prepared), "--split", "test", "--out", str(out),
               "--visualize", "2", "--compare-paper", "flickr30k/resnet50/stage2", "--save-embeddings",
               str(tmp_path / "emb.npz"))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["split"] == "test" and res["num_images"] == 3 and res["num_texts"] == 6
    assert res["pretrained_source"] and res["config"]["arch"] == "resnet18" and res["captions"] == "all"
    # the numbers are those of the test-time features scored by the metric core
    emb = np.load(tmp_path / "emb.npz")
    want = evaluate_retrieval(*(torch.from_numpy(emb[k]) for k in ("images", "texts", "image_labels",
                                                                   "text_labels")))
    assert res["t2i"]["R@1"] == pytest.approx(want["t2i"]["R@1"])
    d = Prepared(prepared)
    model_, _ = load_model(checkpoint, d, torch.device("cpu"))
    feats = encode_split(model_, d, "test", torch.device("cpu"))
    np.testing.assert_allclose(emb["images"], feats["images"], rtol=1e-5, atol=1e-5)
    # pictures: both grids written, and the paper comparison warns about the protocol mismatch
    for name in ("t2i", "i2t"):
        png = out.parent / f"retrieval_test_{name}.png"
        assert png.is_file() and min(Image.open(png).size) > 100
    assert "| metric | paper | ours | difference" in proc.stdout
    assert f"| t2i R@1 | 39.20 | {res['t2i']['R@1']:.2f} |" in proc.stdout  # Table 1 value beside ours
    assert f"WARNING: our protocol is '{res['protocol']}'" in proc.stdout and "not comparable" in proc.stdout
    table = run("--table", str(out), str(out))
    assert table.returncode == 0 and table.stdout.count(f"{res['t2i']['R@1']:.1f}") >= 2
    # then one chance row for the split size (3 images, 2 captions each): t2i R@1 = 1/3, i2t R@1 = 1 - 4/6
    chance = [line for line in table.stdout.splitlines() if line.startswith("| chance")]
    assert chance == ["| chance (3 images, 2 captions each) | 33.3 | 100.0 | 100.0 | 2.0 | – | 33.3 | 100.0 | "
                      "100.0 | 2.0 | – | 466.7 |"], table.stdout


def test_protocol_names_match_paper_rows():
    from engine.paper import load_paper_rows
    protocols = {row["protocol"] for row in load_paper_rows().values()}
    assert evaluate.protocol_name("flickr30k", "test", 1000, None, None) in protocols
    assert evaluate.protocol_name("flickr30k", "val", 1000, None, None) in protocols
    assert evaluate.protocol_name("coco", "test", 5000, None, None) in protocols
    assert evaluate.protocol_name("coco", "test", 5000, 5, None) in protocols
    assert evaluate.protocol_name("cuhk_pedes", "test", 3074, None, None) in protocols
    assert evaluate.protocol_name("coco", "test", 5000, None, 5) not in protocols  # first-5 is a different row
    # fewer captions than the paper scored is never its protocol, whatever the dataset
    assert evaluate.protocol_name("flickr30k", "test", 1000, None, 1) == "flickr30k-1k-test-first1caps"
    assert evaluate.protocol_name("cuhk_pedes", "test", 3074, None, 1) == "cuhk-pedes-test-first1caps"


def test_first_k_needs_a_checkpoint():
    """Saved embeddings carry no caption index: --first-k cannot filter them (it was ignored yet recorded)."""
    proc = run("--embeddings", "x.npz", "--first-k", "2")
    assert proc.returncode == 2 and "--first-k needs --checkpoint" in proc.stderr


def test_checkpoint_needs_data():
    proc = run("--checkpoint", "x.pt")
    assert proc.returncode == 2 and "--data" in proc.stderr
