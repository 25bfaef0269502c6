"""--dictionary FILE on the preparers: captions indexed with a GIVEN word list and order (the authors' dictionary),
its vectors, no dictionary built; dictionary_sha256 recorded for every preparation; engine.model_io refuses a
checkpoint whose dictionary hash differs from the prepared directory's."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from prepare import flickr30k
from prepare.core import tokenize
from tests import matconvnet_fixtures as mfx
from tests.fixtures import FLICKR_DICTIONARY, W2V_WORDS, assert_contract, make_flickr

# The authors' order differs from ours on purpose (reversed), and holds a word no caption uses ("unused").
GIVEN = ["unused"] + FLICKR_DICTIONARY[::-1]


@pytest.fixture(scope="module")
def f30k(tmp_path_factory):
    return make_flickr(tmp_path_factory.mktemp("f30k"), style="30k")


def args(files, out, *extra):
    return ["--images", str(files.images), "--captions", str(files.token), "--split-json", str(files.split_json),
            "--out", str(out), "--workers", "1", "--image-size", "16", *extra]


def check_indexing(p, words):
    index = {w: i + 1 for i, w in enumerate(words)}
    for r, raw in enumerate(p.captions["raw"]):
        ids = [index[t] for t in tokenize(raw) if t in index][:32]
        assert p.tokens[r, :len(ids)].tolist() == ids and p.captions["length"][r] == len(ids)


def test_authors_mat_dictionary_gives_words_order_and_vectors(f30k, tmp_path):
    subset = mfx.dictionary_struct(GIVEN)
    mat = mfx.save_v5(tmp_path / "flickr30k_dictionary.mat", {"subset": subset})
    out = tmp_path / "prep"
    assert flickr30k.main(args(f30k, out, "--dictionary", str(mat))) == 0  # no --word2vec needed
    p = assert_contract(out)
    assert p.dictionary == GIVEN and p.manifest["vocab_size"] == len(GIVEN)
    np.testing.assert_array_equal(p.word2vec, subset["features"].T)  # column v of subset.features = word v
    check_indexing(p, GIVEN)
    m = p.manifest
    assert m["dictionary_sha256"] == hashlib.sha256((out / "dictionary.txt").read_bytes()).hexdigest()
    assert m["dictionary_source"]["sha256"] == hashlib.sha256(mat.read_bytes()).hexdigest()
    assert m["dictionary_source"]["format"].startswith("matlab subset") and "word2vec" not in m["inputs"]


def test_word_list_dictionary_takes_vectors_from_word2vec(f30k, tmp_path):
    lst = tmp_path / "words.txt"
    lst.write_text("\n".join(GIVEN) + "\n", encoding="utf-8")
    out = tmp_path / "prep"
    assert flickr30k.main(args(f30k, out, "--dictionary", str(lst), "--word2vec", str(f30k.w2v.binary))) == 0
    p = assert_contract(out)
    assert p.dictionary == GIVEN
    np.testing.assert_array_equal(p.word2vec, f30k.w2v.vectors[[W2V_WORDS.index(w) for w in GIVEN]])
    check_indexing(p, GIVEN)
    assert "word2vec" in p.manifest["inputs"]


def test_word_list_errors(f30k, tmp_path, capsys):
    lst = tmp_path / "words.txt"
    lst.write_text("the\nnot-in-w2v\n", encoding="utf-8")
    out = tmp_path / "prep"
    assert flickr30k.main(args(f30k, out, "--dictionary", str(lst))) == 2
    assert "word list without vectors: pass --word2vec" in capsys.readouterr().err
    assert flickr30k.main(args(f30k, out, "--dictionary", str(lst), "--word2vec", str(f30k.w2v.text))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'not-in-w2v'" in err and str(lst) in err
    assert flickr30k.main(args(f30k, out)) == 2
    assert "--word2vec FILE|train is required" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("prep.tmp-*"))


def test_normal_preparation_records_the_dictionary_hash(f30k, tmp_path):
    out = tmp_path / "prep"
    assert flickr30k.main(args(f30k, out, "--word2vec", str(f30k.w2v.text))) == 0
    p = assert_contract(out)
    assert p.dictionary == FLICKR_DICTIONARY and p.manifest["dictionary_source"] == "train captions only"
    assert p.manifest["dictionary_sha256"] == hashlib.sha256((out / "dictionary.txt").read_bytes()).hexdigest()


def test_model_io_refuses_another_dictionary_naming_both_hashes(f30k, tmp_path):
    import torch

    from engine.model_io import CheckpointMismatch, load_model
    out = tmp_path / "prep"
    assert flickr30k.main(args(f30k, out, "--word2vec", str(f30k.w2v.text))) == 0
    m = assert_contract(out).manifest
    facts = {k: m[k] for k in ("dataset", "num_classes", "vocab_size", "max_len")}
    ckpt = tmp_path / "other.pt"
    torch.save({"model": {}, "config": {}, "data": {**facts, "dictionary_sha256": "ab" * 32}}, ckpt)
    with pytest.raises(CheckpointMismatch) as e:
        load_model(ckpt, out)
    assert "ab" * 32 in str(e.value) and m["dictionary_sha256"] in str(e.value) and "dictionary_sha256" in str(e.value)
    torch.save({"model": {}, "config": {}, "data": {**facts, "vocab_size": facts["vocab_size"] + 1}}, ckpt)
    with pytest.raises(CheckpointMismatch, match=f"vocab_size {facts['vocab_size'] + 1} "):
        load_model(ckpt, out)  # an older checkpoint without the hash: the vocabulary size is still compared
