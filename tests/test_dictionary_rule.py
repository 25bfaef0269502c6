"""``--dictionary-rule original`` (issue 12): Flickr30k's dictionary as make_dictionary.m built it (train + val
captions, whitespace split, word2vec file order); MSCOCO's: training captions split without '?'; CUHK-PEDES: the
default rule already is the original's; the size warning against the original dictionaries (20,074 / 29,972 /
7,263) with the full GoogleNews file."""
from __future__ import annotations

import pytest

from prepare import coco, flickr30k
from prepare.core import COCO_DELIMITERS, GOOGLENEWS_WORDS, dictionary_size_warning, dictionary_tokens, tokenize
from tests.fixtures import FLICKR_DICTIONARY, make_coco, make_flickr

# Built by hand from tests/fixtures.py FLICKR_CAPTIONS: whitespace tokens of the train (1001-1005) and val (2001)
# captions that are word2vec keys, in W2V_WORDS order. "zebra"/"grazes" come from the val image; "fast", "brown",
# "jumps", "high" only occur glued to punctuation ("runs-fast", "(brown)", "jumps,high"), so whitespace splitting
# never sees them; "An"/"elephant" are test-only; "to"/"xyzzy"/"qwerty" are not keys.
ORIGINAL_DICTIONARY = ["the", "zebra", "dog", "Dog", "A", "runs", "Two", "men", "walking", "work", "cat", "sleeps",
                       "grazes", "DOG"]


@pytest.fixture(scope="module")
def f30k(tmp_path_factory):
    return make_flickr(tmp_path_factory.mktemp("f30k"), style="30k")


def prepare_flickr(files, out, *extra):
    args = ["--images", str(files.images), "--captions", str(files.token), "--word2vec", str(files.w2v.text),
            "--out", str(out), "--workers", "1", "--image-size", "16", "--flickr8k-lists", str(files.lists), *extra]
    assert flickr30k.main(args) == 0
    from tests.fixtures import read_prepared
    return read_prepared(out)


def test_original_rule_builds_make_dictionary_m_dictionary(f30k, tmp_path):
    p = prepare_flickr(f30k, tmp_path / "orig", "--dictionary-rule", "original")
    assert p.dictionary == ORIGINAL_DICTIONARY and p.manifest["vocab_size"] == len(ORIGINAL_DICTIONARY)
    text = p.manifest["text"]
    assert text["dictionary_rule"] == "original" and "whitespace" in text["dictionary_from"]
    # indexing still uses the delimiter tokenisation: "A Dog runs-fast ." -> A, Dog, runs ("fast" is not a word)
    index = {w: i + 1 for i, w in enumerate(ORIGINAL_DICTIONARY)}
    cap = p.captions
    row = cap.index[cap["raw"] == "A Dog runs-fast ."][0]
    assert p.tokens[row, :4].tolist() == [index["A"], index["Dog"], index["runs"], 0]
    for r, raw in enumerate(cap["raw"]):
        ids = [index[t] for t in tokenize(raw) if t in index][:32]
        assert p.tokens[r, :len(ids)].tolist() == ids and cap["length"][r] == len(ids)
    # a val caption is no longer empty (its words are in the dictionary): the leak the default rule avoids
    assert cap.loc[cap["raw"] == "A zebra grazes", "length"].tolist() == [3]


def test_default_rule_is_train_only_and_recorded(f30k, tmp_path):
    p = prepare_flickr(f30k, tmp_path / "train")
    assert p.dictionary == FLICKR_DICTIONARY
    assert p.manifest["text"]["dictionary_rule"] == "train"
    assert "dictionary_size" not in p.manifest["warnings"]  # a small file: no GoogleNews comparison


def test_coco_original_rule_splits_the_dictionary_without_question_marks(tmp_path):
    """MSCOCO-prepare/make_dictionary.m splits the training captions on - . , ( ) and space, its indexing
    (prepare_wordcnn_feature2.m) on '?' too: "giraffe?Yes" gives the dictionary no "giraffe" and no "Yes"."""
    captions = [("train", "Is that a giraffe?Yes it is"), ("train", "a dog (running)"), ("val", "a zebra")]
    token_lists = [tokenize(raw, COCO_DELIMITERS) for _, raw in captions]
    orig, how = dictionary_tokens("coco", "original", captions, token_lists)
    assert orig == [["Is", "that", "a", "giraffe?Yes", "it", "is"], ["a", "dog", "running"]] and "'?'" in how
    train, _ = dictionary_tokens("coco", "train", captions, token_lists)
    assert train == token_lists[:2] and "giraffe" in train[0]
    files = make_coco(tmp_path / "raw")  # the fixture's captions have no '?': both rules give the same words
    outs = {}
    for rule in ("train", "original"):
        out = tmp_path / rule
        assert coco.main(["--images", str(files.root), "--split-json", str(files.karpathy), "--word2vec",
                          str(files.w2v.text), "--out", str(out), "--workers", "1", "--image-size", "16",
                          "--dictionary-rule", rule]) == 0
        outs[rule] = (out / "dictionary.txt").read_text()
    assert outs["train"] == outs["original"]


def test_original_rule_refuses_trained_word2vec(f30k, tmp_path, capsys):
    args = ["--images", str(f30k.images), "--captions", str(f30k.token), "--word2vec", "train", "--out",
            str(tmp_path / "x"), "--workers", "1", "--flickr8k-lists", str(f30k.lists), "--dictionary-rule",
            "original"]
    assert flickr30k.main(args) == 2
    assert "error: --dictionary-rule original needs a word2vec file" in capsys.readouterr().err


FULL = {"vectors_in_file": GOOGLENEWS_WORDS, "vectors_scanned": GOOGLENEWS_WORDS}


@pytest.mark.parametrize("dataset, rule, size, info, warns", [
    ("flickr30k", "original", 20074, FULL, False),
    ("flickr30k", "original", 20073, FULL, True),
    ("flickr30k", "train", 18000, FULL, False),  # the leak-free rule is expected to differ
    ("flickr30k", "original", 20073, {"vectors_in_file": 1000, "vectors_scanned": 1000}, False),
    ("flickr30k", "original", 20073, {"vectors_in_file": GOOGLENEWS_WORDS, "vectors_scanned": 500_000}, False),
    ("coco", "original", 29972, FULL, False),
    ("coco", "original", 29000, FULL, True),
    ("coco", "train", 29000, FULL, False),  # MSCOCO's train rule also splits the dictionary's captions on '?'
    ("cuhk_pedes", "train", 7262, FULL, True),  # CUHK-PEDES's train rule is the original's
    ("cuhk_pedes", "original", 7262, FULL, True),
    ("flickr8k", "original", 5, FULL, False),  # no original dictionary to compare with
])
def test_dictionary_size_warning(dataset, rule, size, info, warns):
    msg = dictionary_size_warning(dataset, rule, size, info)
    assert (msg is not None) == warns
    if warns:
        assert str(size) in msg and {"flickr30k": "20074", "coco": "29972", "cuhk_pedes": "7263"}[dataset] in msg
