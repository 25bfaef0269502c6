"""prepare.flickr30k / prepare.flickr8k end to end on generated raw files in the real formats."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prepare import flickr8k, flickr30k
from prepare.core import tokenize
from tests.fixtures import (FLICKR_CAPTIONS, FLICKR_DICTIONARY, W2V_WORDS, assert_contract, flickr_name,
                            make_flickr)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def f30k(tmp_path_factory):
    return make_flickr(tmp_path_factory.mktemp("f30k"), style="30k")


@pytest.fixture(scope="module")
def f8k(tmp_path_factory):
    return make_flickr(tmp_path_factory.mktemp("f8k"), style="8k")


def base_args(files, out, w2v=None, *extra):
    return ["--images", str(files.images), "--captions", str(files.token), "--word2vec", str(w2v or files.w2v.text),
            "--out", str(out), "--workers", "1", "--image-size", "16", *extra]


@pytest.mark.parametrize("w2v_kind", ["text", "binary", "binary_gz", "text_gz"])
def test_flickr30k_original_split_from_flickr8k_lists(f30k, tmp_path, w2v_kind):
    out = tmp_path / "prep"
    w2v = getattr(f30k.w2v, w2v_kind)
    assert flickr30k.main(base_args(f30k, out, w2v, "--flickr8k-lists", str(f30k.lists))) == 0
    p = assert_contract(out)
    m, im, cap = p.manifest, p.images, p.captions
    # photo-id match: Flickr8k-style list names select the Flickr30k '<id>.jpg' images
    assert im["file"].tolist() == ["1001.jpg", "1002.jpg", "1003.jpg", "1004.jpg", "1005.jpg", "2001.jpg", "3001.jpg"]
    assert im["split"].tolist() == ["train"] * 5 + ["val", "test"]
    assert m["dataset"] == "flickr30k" and m["num_classes"] == 5 and m["match"] == "image"
    assert {s: (d["images"], d["captions"]) for s, d in m["splits"].items()} == \
        {"train": (5, 25), "val": (1, 5), "test": (1, 5)}
    # the exact dictionary: case-sensitive, delimiters, absent words dropped, train captions only
    assert p.dictionary == FLICKR_DICTIONARY and m["vocab_size"] == len(FLICKR_DICTIONARY)
    rows = [W2V_WORDS.index(w) for w in FLICKR_DICTIONARY]
    if "binary" in w2v_kind:
        assert np.array_equal(p.word2vec, f30k.w2v.vectors[rows])
    else:
        np.testing.assert_allclose(p.word2vec, f30k.w2v.vectors[rows], rtol=1e-6)
    # tokens: every caption indexed exactly as the spec says
    index = {w: i + 1 for i, w in enumerate(FLICKR_DICTIONARY)}
    for r, raw in enumerate(cap["raw"]):
        ids = [index[t] for t in tokenize(raw) if t in index][:32]
        assert p.tokens[r, :len(ids)].tolist() == ids and cap["length"][r] == len(ids)
    assert cap["raw"].tolist()[:2] == list(FLICKR_CAPTIONS["1001"][1][:2])
    assert cap["k"].tolist()[:6] == [0, 1, 2, 3, 4, 0]
    # warnings: missing file, the '.jpg.1' quirk, the file without captions, the empty caption
    w = m["warnings"]
    assert w["caption_image_missing"]["count"] == 1 and w["image_no_captions"]["count"] == 1
    assert w["caption_odd_image_name"]["count"] == 1 and "'1001.jpg.1'" in w["caption_odd_image_name"]["examples"][0]
    assert w["empty_caption"]["count"] == 6 and "xyzzy qwerty" in w["empty_caption"]["examples"][0]
    # val/test words ("zebra", "elephant", "An") never enter the dictionary, so these val/test captions are empty
    assert [m["splits"][s]["empty_captions"] for s in ("train", "val", "test")] == [1, 2, 3]
    assert cap.loc[cap["raw"] == "xyzzy qwerty", "length"].tolist() == [0]
    assert set(m["inputs"]) == {"captions", "val_list", "test_list", "word2vec"}
    assert m["word2vec"]["format"] == ("binary" if "binary" in w2v_kind else "text")
    assert m["splits"]["train"]["mean_length"] == pytest.approx(cap.loc[cap["split"] == "train", "length"].mean())
    # images: shorter side == S, RGB JPEG; the big 300x200 original went through draft mode
    for f in im["file"]:
        with Image.open(out / "images" / f) as img:
            assert min(img.size) == 16 and img.mode == "RGB" and img.format == "JPEG"
    assert Image.open(out / "images" / "1003.jpg").size == (24, 16)
    assert not list(tmp_path.glob("prep.tmp-*"))


def test_flickr30k_karpathy_json_restval_is_train(f30k, tmp_path):
    out = tmp_path / "prep"
    assert flickr30k.main(base_args(f30k, out, None, "--split-json", str(f30k.split_json), "--max-len", "3")) == 0
    p = assert_contract(out)
    assert p.images["split"].tolist() == ["train"] * 5 + ["val", "test"] and p.manifest["num_classes"] == 5
    assert p.dictionary == FLICKR_DICTIONARY
    assert p.manifest["warnings"]["caption_image_not_in_split"]["count"] == 1
    assert p.manifest["warnings"]["caption_odd_image_name"]["count"] == 1
    assert p.manifest["split_mode"] == "karpathy_json" and "split_json" in p.manifest["inputs"]
    # truncation at max_len: "cat cat ... cat" (10 words) keeps 3
    long = p.captions["raw"] == FLICKR_CAPTIONS["1003"][1][0]
    assert p.captions.loc[long, "length"].tolist() == [3]
    # truncated: the cats, "A Dog runs-fast", "the dog (brown) ...", "Two men..."
    assert p.manifest["splits"]["train"]["truncated"] == 4
    assert p.tokens.shape[1] == 3


def test_flickr8k_split_lists_and_overridable_names(f8k, tmp_path):
    out = tmp_path / "prep"
    assert flickr8k.main(base_args(f8k, out, None, "--split-lists", str(f8k.lists))) == 0
    p = assert_contract(out)
    assert p.manifest["dataset"] == "flickr8k" and p.manifest["split_mode"] == "split_lists"
    assert p.images["file"].tolist()[-2:] == [flickr_name("2001", "8k"), flickr_name("3001", "8k")]
    assert p.manifest["num_classes"] == 5 and p.dictionary == FLICKR_DICTIONARY
    # renamed list files (like the *.subset1k.txt ones) via --val-list/--test-list
    for name in ("Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt"):
        (f8k.lists / name.replace(".txt", ".sub.txt")).write_text((f8k.lists / name).read_text())
    out2 = tmp_path / "prep2"
    assert flickr8k.main(base_args(f8k, out2, None, "--flickr8k-lists", str(f8k.lists), "--val-list",
                                   "Flickr_8k.devImages.sub.txt", "--test-list", "Flickr_8k.testImages.sub.txt")) == 0
    p2 = assert_contract(out2)
    assert p2.manifest["splits"]["val"]["images"] == 1
    assert p2.manifest["inputs"]["val_list"]["path"].endswith(".sub.txt")


def test_word2vec_train_option_is_recorded(f30k, tmp_path):
    out = tmp_path / "prep"
    args = base_args(f30k, out, None, "--flickr8k-lists", str(f30k.lists), "--word2vec-train-epochs", "1")
    args[args.index("--word2vec") + 1] = "train"
    assert flickr30k.main(args) == 0
    p = assert_contract(out)
    assert p.manifest["word2vec"]["source"] == "trained" and "word2vec" not in p.manifest["inputs"]
    assert set(p.dictionary) == {t for r in p.captions.loc[p.captions["split"] == "train", "raw"] for t in tokenize(r)}
    assert "zebra" not in p.dictionary and p.word2vec.shape == (len(p.dictionary), 300)


def test_refuses_existing_output_unless_overwrite(f30k, tmp_path, capsys):
    out = tmp_path / "prep"
    args = base_args(f30k, out, None, "--flickr8k-lists", str(f30k.lists))
    assert flickr30k.main(args) == 0
    created = (out / "manifest.json").read_text()
    assert flickr30k.main(args) == 2
    assert "already holds a prepared dataset" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == created
    assert flickr30k.main(args + ["--overwrite", "--image-size", "20"]) == 0
    assert assert_contract(out).manifest["image_resize"]["size"] == 20
    assert sorted(x.name for x in tmp_path.iterdir()) == ["prep"]  # no tmp / old directories left


def test_cli_subprocess_with_process_pool(f30k, tmp_path):
    out = tmp_path / "prep"
    args = base_args(f30k, out, f30k.w2v.binary, "--split-json", str(f30k.split_json))
    args[args.index("--workers") + 1] = "2"
    res = subprocess.run([sys.executable, "-m", "prepare.flickr30k", *args], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "train" in res.stdout and "warning caption_image_not_in_split: 1" in res.stdout
    assert_contract(out)
    help_text = subprocess.run([sys.executable, "-m", "prepare.flickr8k", "--help"], cwd=ROOT,
                               capture_output=True, text=True).stdout
    for flag in ("--split-lists", "--flickr8k-lists", "--split-json", "--val-list", "--word2vec-limit",
                 "--word2vec-stream", "--max-len", "--image-size", "--workers", "--skip-missing"):
        assert flag in help_text


def test_stream_and_limit_flags(f30k, tmp_path):
    out = tmp_path / "prep"
    assert flickr30k.main(base_args(f30k, out, f30k.w2v.binary_gz, "--flickr8k-lists", str(f30k.lists),
                                    "--word2vec-stream", "--word2vec-limit", "10")) == 0
    p = assert_contract(out)
    assert p.dictionary == [w for w in FLICKR_DICTIONARY if w in W2V_WORDS[:10]]
    info = p.manifest["word2vec"]
    assert info["loader"] == "stream" and info["limit"] == 10 and info["vectors_scanned"] == 10
    assert np.array_equal(p.word2vec, f30k.w2v.vectors[[W2V_WORDS.index(w) for w in p.dictionary]])
