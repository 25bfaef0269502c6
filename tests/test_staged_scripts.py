"""The staged scripts choose the paper row's recipe and the paper's split (issue 12): scripts/flickr30k.sh prepares
the original code's split unless SPLIT=karpathy, coco.sh says it uses Karpathy's split, and ARCH picks the configs.
The scripts are stopped at the prepare step by inputs that do not exist; the error shows which option was used."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    token = tmp_path / "captions.token"
    token.write_text("1.jpg#0\tA dog\n")
    base = dict(os.environ, IMAGES=str(images), CAPTIONS=str(token), WORD2VEC=str(tmp_path / "w2v.txt"),
                PREPARED=str(tmp_path / "prep"), RUNS=str(tmp_path / "runs"), ROOT=str(tmp_path / "cuhk"),
                FLICKR8K_LISTS=str(tmp_path / "lists"), SPLIT_JSON=str(tmp_path / "karpathy.json"))
    return subprocess.run(["bash", f"scripts/{script}"], cwd=ROOT, env={**base, **env}, capture_output=True,
                          text=True, timeout=300)


def test_flickr30k_prepares_the_original_split_by_default(tmp_path):
    r = run("flickr30k.sh", tmp_path)
    assert r.returncode == 2
    assert "[split] the original code's split" in r.stdout
    assert "Flickr_8k.devImages.txt" in r.stderr and str(tmp_path / "lists") in r.stderr  # --flickr8k-lists
    assert not (tmp_path / "prep").exists()


def test_flickr30k_karpathy_split_on_request(tmp_path):
    r = run("flickr30k.sh", tmp_path, SPLIT="karpathy")
    assert r.returncode == 2
    assert "Karpathy's split (SPLIT=karpathy): not the paper's" in r.stdout
    assert "karpathy.json" in r.stderr  # --split-json


def test_coco_says_it_uses_karpathys_split(tmp_path):
    r = run("coco.sh", tmp_path, IMAGES=str(tmp_path / "nococo"))
    assert r.returncode == 2
    assert "Karpathy's split" in r.stdout and "cannot be rebuilt" in r.stdout


@pytest.mark.parametrize("script, arch, valid", [("flickr30k.sh", "vgg16", "resnet50, resnet152, vgg19"),
                                                 ("coco.sh", "resnet152", "resnet50, vgg19"),
                                                 ("cuhk_pedes.sh", "vgg19", "resnet50, vgg16")])
def test_arch_choices(tmp_path, script, arch, valid):
    r = run(script, tmp_path, ARCH=arch)
    assert r.returncode == 2 and f"error: ARCH={arch}; valid: {valid}" in r.stderr


def test_every_arch_of_every_script_names_existing_configs_and_paper_rows():
    from engine.paper import load_paper_rows
    rows = load_paper_rows()
    for script, archs, config, row in (("flickr30k", ("resnet152", "vgg19"), "flickr30k_{a}_stage{s}",
                                        "flickr30k/{a}/stage{s}"),
                                       ("cuhk_pedes", ("vgg16",), "cuhk_pedes_{a}_stage{s}", "cuhk-pedes/{a}/stage{s}"),
                                       ("coco", ("vgg19",), "coco_{a}_stage{s}", None)):
        text = (ROOT / "scripts" / f"{script}.sh").read_text()
        for a in archs:
            for s in (1, 2):
                assert (ROOT / "configs" / (config.format(a=a, s=s) + ".yaml")).is_file()
                if row:
                    assert row.format(a=a, s=s) in rows
        assert "ARCH=${ARCH:-resnet50}" in text
