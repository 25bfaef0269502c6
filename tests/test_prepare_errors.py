"""Bad inputs give a clear 'error: ...' (exit 2) naming file and line/key, or a counted warning; nothing is left
behind at --out (no output dir, no temporary dir) after an error or an interruption."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from prepare import coco, cuhk_pedes, flickr30k, images
from prepare.core import PrepareError
from tests.fixtures import make_coco, make_cuhk, make_flickr, write_word2vec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def f30k(tmp_path):
    return make_flickr(tmp_path / "raw", style="30k")


def run(files, out, *extra, w2v=None, split=None):
    split = split or ["--flickr8k-lists", str(files.lists)]
    return flickr30k.main(["--images", str(files.images), "--captions", str(files.token), *split,
                           "--word2vec", str(w2v or files.w2v.text), "--out", str(out), "--workers", "1",
                           "--image-size", "16", *extra])


def assert_error(capsys, out, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for frag in fragments:
        assert frag in err, (frag, err)
    assert not out.exists() and not list(out.parent.glob(out.name + ".tmp-*"))
    return err


def test_missing_inputs(f30k, tmp_path, capsys):
    out = tmp_path / "out"
    f30k.token.rename(f30k.token.with_suffix(".gone"))
    assert run(f30k, out) == 2
    assert_error(capsys, out, "caption file", "captions.token: no such file")
    f30k.token.with_suffix(".gone").rename(f30k.token)
    assert run(f30k, out, w2v=tmp_path / "nope.bin") == 2
    assert_error(capsys, out, "word2vec file", "nope.bin: no such file")
    (f30k.lists / "Flickr_8k.devImages.txt").unlink()
    assert run(f30k, out) == 2
    assert_error(capsys, out, "val list", "Flickr_8k.devImages.txt: no such file")


def test_caption_line_that_does_not_parse(f30k, tmp_path, capsys):
    lines = f30k.token.read_text().splitlines()
    lines[6] = "1002.jpg 0 Two men without a tab"
    f30k.token.write_text("\n".join(lines) + "\n")
    assert run(f30k, tmp_path / "out") == 2
    assert_error(capsys, tmp_path / "out", "captions.token:7: expected 'name.jpg#k<TAB>caption'")


def test_truncated_jpeg_names_the_file(f30k, tmp_path, capsys):
    img = f30k.images / "1003.jpg"  # 300x200: also exercises the draft path
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    assert run(f30k, tmp_path / "out") == 2
    assert_error(capsys, tmp_path / "out", "1003.jpg", "truncated")
    assert run(f30k, tmp_path / "out", "--workers", "2") == 2  # same through the process pool
    assert_error(capsys, tmp_path / "out", "1003.jpg")


def test_interrupted_prepare_leaves_nothing(f30k, tmp_path, monkeypatch, capsys):
    real, calls = images.resize_image, []

    def flaky(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "resize_image", flaky)
    out = tmp_path / "deep" / "out"
    assert run(f30k, out) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "deep").exists() and len(calls) == 3
    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # programmatic use: the interrupt propagates, nothing is left
        flickr30k.prepare(flickr30k.build_parser().parse_args(
            ["--images", str(f30k.images), "--captions", str(f30k.token), "--flickr8k-lists", str(f30k.lists),
             "--word2vec", str(f30k.w2v.text), "--out", str(out), "--workers", "1"]))
    assert not out.exists() and not (tmp_path / "deep").exists()


def test_existing_prepared_dir_unchanged_after_failed_overwrite(f30k, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run(f30k, out) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    monkeypatch.setattr(images, "resize_image", lambda *a, **k: (_ for _ in ()).throw(PrepareError("boom")))
    assert run(f30k, out, "--overwrite") == 2
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


def test_karpathy_json_unknown_split_and_missing_key(f30k, tmp_path, capsys):
    data = json.loads(f30k.split_json.read_text())
    data["images"][2]["split"] = "dev"
    f30k.split_json.write_text(json.dumps(data))
    split = ["--split-json", str(f30k.split_json)]
    assert run(f30k, tmp_path / "out", split=split) == 2
    assert_error(capsys, tmp_path / "out", "images[2] (1003.jpg): unknown split 'dev'", "train, restval, val, test")
    del data["images"][2]["split"]
    f30k.split_json.write_text(json.dumps(data))
    assert run(f30k, tmp_path / "out", split=split) == 2
    assert_error(capsys, tmp_path / "out", "dataset_flickr.json: images[2]: missing required key 'split'")
    f30k.split_json.write_text('{"images": [\n  {"filename": "1001.jpg",}\n]}')
    assert run(f30k, tmp_path / "out", split=split) == 2
    assert_error(capsys, tmp_path / "out", "dataset_flickr.json:2: not valid JSON")


def test_split_image_without_captions_or_file(f30k, tmp_path, capsys):
    data = json.loads(f30k.split_json.read_text())
    data["images"].append({"filename": "9999.jpg", "split": "test", "sentences": []})  # on disk, no captions
    data["images"].append({"filename": "5555.jpg", "split": "val", "sentences": []})  # no file at all
    f30k.split_json.write_text(json.dumps(data))
    split = ["--split-json", str(f30k.split_json)]
    assert run(f30k, tmp_path / "out", split=split) == 2
    assert_error(capsys, tmp_path / "out", "images[7]: test image 9999.jpg has no captions", "--skip-missing")
    assert run(f30k, tmp_path / "out", "--skip-missing", split=split) == 0
    w = json.loads((tmp_path / "out" / "manifest.json").read_text())["warnings"]
    assert w["split_image_no_captions"]["count"] == 1 and w["split_image_missing"]["count"] == 1
    assert "images[8]: val image 5555.jpg not found" in w["split_image_missing"]["examples"][0]


def test_word2vec_wrong_dimension(f30k, tmp_path, capsys):
    small = tmp_path / "small.txt"
    write_word2vec(small, ["dog", "A"], binary=False, dim=20)
    assert run(f30k, tmp_path / "out", w2v=small) == 2
    assert_error(capsys, tmp_path / "out", "small.txt: word2vec vectors have dimension 20, expected 300")


def test_no_training_word_in_word2vec(f30k, tmp_path, capsys):
    other = tmp_path / "other.bin"
    write_word2vec(other, ["zebra", "elephant"], binary=True)
    assert run(f30k, tmp_path / "out", w2v=other) == 2
    assert_error(capsys, tmp_path / "out", "no token of the training captions is a key of", "other.bin")


def test_coco_and_cuhk_json_errors(tmp_path, capsys):
    c = make_coco(tmp_path / "coco")
    data = json.loads(c.captions[0].read_text())
    del data["annotations"][3]["caption"]
    c.captions[0].write_text(json.dumps(data))
    out = tmp_path / "out"
    args = ["--images", str(c.root), "--captions-json", *map(str, c.captions), "--random-split", "1", "1",
            "--word2vec", str(c.w2v.binary), "--out", str(out), "--workers", "1"]
    assert coco.main(args) == 2
    assert_error(capsys, out, "captions_train2014.json: annotations[3]: missing required key 'caption'")
    k = json.loads(c.karpathy.read_text())
    del k["images"][1]["filepath"]
    c.karpathy.write_text(json.dumps(k))
    assert coco.main(["--images", str(c.root), "--split-json", str(c.karpathy), *args[-6:]]) == 2
    assert_error(capsys, out, "dataset_coco.json: images[1]: missing required key 'filepath'")
    assert coco.main(["--images", str(tmp_path), "--split-json", str(c.karpathy), *args[-6:]]) == 2
    assert_error(capsys, out, "expected COCO folders train2014/ val2014/ or train2017/ val2017/")

    h = make_cuhk(tmp_path / "cuhk")
    entries = json.loads((h.root / "reid_raw.json").read_text())
    entries[4]["split"] = "query"
    (h.root / "reid_raw.json").write_text(json.dumps(entries))
    cargs = ["--root", str(h.root), "--word2vec", str(h.w2v.text), "--out", str(out), "--workers", "1"]
    assert cuhk_pedes.main(cargs) == 2
    assert_error(capsys, out, "reid_raw.json: [4]: unknown split 'query'; valid: train, val, test")
    entries[4]["split"] = "train"
    del entries[2]["id"]
    (h.root / "reid_raw.json").write_text(json.dumps(entries))
    assert cuhk_pedes.main(cargs) == 2
    assert_error(capsys, out, "reid_raw.json: [2]: missing required key 'id'")
    entries[2]["id"] = 5
    (h.root / "reid_raw.json").write_text(json.dumps(entries))
    (h.root / "imgs" / entries[6]["file_path"]).unlink()
    assert cuhk_pedes.main(cargs) == 2
    assert_error(capsys, out, "reid_raw.json: [6]: val image Market/11_b.jpg not found")
    assert cuhk_pedes.main(cargs + ["--skip-missing"]) == 0


def test_cli_error_is_one_line_exit_2(tmp_path):
    res = subprocess.run([sys.executable, "-m", "prepare.cuhk_pedes", "--root", str(tmp_path / "none"),
                          "--word2vec", "x.bin", "--out", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip() == f"error: --root {tmp_path / 'none'}: no such directory"


def test_two_sources_with_one_output_name(tmp_path, capsys):
    h = make_cuhk(tmp_path / "cuhk")
    entries = json.loads((h.root / "reid_raw.json").read_text())
    entries[1]["file_path"] = "CUHK01/0005001.jpg"  # next to CUHK01/0005001.png: both -> images/CUHK01/0005001.jpg
    from tests.fixtures import write_image
    write_image(h.root / "imgs" / "CUHK01" / "0005001.jpg")
    (h.root / "reid_raw.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    assert cuhk_pedes.main(["--root", str(h.root), "--word2vec", str(h.w2v.text), "--out", str(out)]) == 2
    assert_error(capsys, out, "two images would both be written as images/CUHK01/0005001.jpg")
