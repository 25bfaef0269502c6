"""The staged shell pipeline (scripts/_pipeline.sh through scripts/flickr8k.sh): prepare -> Stage I -> evaluate ->
Stage II -> evaluate -> table on a tiny synthetic dataset in the Flickr formats; a second run skips every step."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from prepare.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]


def test_flickr8k_script_runs_every_stage_then_skips(tmp_path):
    raw = make_synthetic(tmp_path / "raw", images=76, val=6, test=6, seed=3)
    env = dict(os.environ, IMAGES=str(raw["images_dir"]), CAPTIONS=str(raw["captions"]),
               SPLIT_JSON=str(raw["split_json"]), WORD2VEC=str(raw["word2vec"]), PREPARED=str(tmp_path / "prep"),
               RUNS=str(tmp_path / "runs"), IMAGE_SIZE="144", STAGE1_EPOCHS="[[1, 1.0]]",
               STAGE2_EPOCHS="[[1, 1.0]]", OMP_NUM_THREADS="1")
    first = subprocess.run(["bash", "scripts/flickr8k.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in (1, 2):
        run = tmp_path / "runs" / f"stage{stage}"
        assert (run / "train_done.json").is_file() and (run / "checkpoint_last.pt").is_file()
        res = json.loads((run / "results_test.json").read_text())
        assert res["split"] == "test" and res["num_images"] == 6 and res["stage"] == stage
        assert res["pretrained_source"].startswith("none")
        assert (run / "retrieval_test_t2i.png").is_file()
    assert "| run | i2t R@1" in first.stdout  # the closing table of both stages
    second = subprocess.run(["bash", "scripts/flickr8k.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    for what in ("[prepare]", "[stage 1]", "[stage 2]", "[evaluate]"):
        assert any(what in line and "skipped" in line for line in second.stdout.splitlines()), what


def test_demo_refuses_a_folder_of_another_seed_or_an_older_recipe(tmp_path):
    """scripts/demo.sh skips every step whose output exists, so an OUT_DIR holding another seed's demo, or a demo of
    the previous recipe (no demo_recipe file), must be refused before anything is written, not silently reused."""
    def demo(out: Path, seed: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "scripts/demo.sh", str(out)], cwd=ROOT, env=dict(os.environ, SEED=seed),
                              capture_output=True, text=True, timeout=120)

    other_seed = tmp_path / "seed1"
    other_seed.mkdir()
    (other_seed / "demo_seed").write_text("1\n")
    (other_seed / "demo_recipe").write_text("2\n")
    r = demo(other_seed, "0")
    assert r.returncode == 2 and "holds the demo of data seed 1, not 0" in r.stderr, r.stderr
    older = tmp_path / "recipe1"
    older.mkdir()
    (older / "demo_seed").write_text("0\n")  # a demo of recipe 1 wrote no demo_recipe
    r = demo(older, "0")
    assert r.returncode == 2 and "older recipe" in r.stderr, r.stderr
    recipe2 = tmp_path / "recipe2"  # 50 test images where recipe 3 scores 250 in 5 folds
    recipe2.mkdir()
    (recipe2 / "demo_seed").write_text("0\n")
    (recipe2 / "demo_recipe").write_text("2\n")
    r = demo(recipe2, "0")
    assert r.returncode == 2 and "older recipe" in r.stderr, r.stderr
    for folder, files in ((other_seed, {"demo_seed", "demo_recipe"}), (older, {"demo_seed"}),
                          (recipe2, {"demo_seed", "demo_recipe"})):
        assert {p.name for p in folder.iterdir()} == files  # nothing written, nothing overwritten
    assert (older / "demo_seed").read_text() == "0\n" and (other_seed / "demo_seed").read_text() == "1\n"
