"""Text pipeline (spec 2.1) and word2vec loading: tokeniser, dictionary, indexing, gensim vs streaming reader."""
import gzip

import numpy as np
import pytest
from gensim.models import KeyedVectors

from prepare import word2vec as w2v
from prepare.core import (COCO_DELIMITERS, PrepareError, build_dictionary, index_captions, tokenize)
from tests.fixtures import DIM, W2V_WORDS, make_word2vec, write_word2vec


def test_tokenize_delimiters_collapse_and_keep_case():
    assert tokenize("A Dog runs-fast .") == ["A", "Dog", "runs", "fast"]
    assert tokenize("the dog (brown) jumps,high") == ["the", "dog", "brown", "jumps", "high"]
    assert tokenize("  x((y))--z,, w\tv\n.u ") == ["x", "y", "z", "w", "v", "u"]
    assert tokenize("it's a dog's life; ok!") == ["it's", "a", "dog's", "life;", "ok!"]  # not delimiters
    assert tokenize("Is this a dog?") == ["Is", "this", "a", "dog?"]  # '?' only for COCO
    assert tokenize("Is this a dog?grass", COCO_DELIMITERS) == ["Is", "this", "a", "dog", "grass"]
    assert tokenize("") == [] and tokenize(" -.,() ") == []


def test_dictionary_exact_match_file_order_train_only():
    train = [tokenize(c) for c in ["A Dog runs", "the dog", "a cat", "to be"]]
    words = ["the", "zebra", "dog", "Dog", "A", "cat", "runs", "Cat", "dog"]  # duplicate keeps the first
    assert build_dictionary(train, words) == ["the", "dog", "Dog", "A", "cat", "runs"]


def test_index_captions_one_based_truncated_padded():
    dictionary = ["the", "dog", "cat"]
    toks, lengths, full = index_captions([["the", "dog", "xx", "cat"], ["nothing"], ["cat"] * 7], dictionary, 4)
    assert toks.dtype == np.int32 and toks.shape == (3, 4)
    assert toks.tolist() == [[1, 2, 3, 0], [0, 0, 0, 0], [3, 3, 3, 3]]
    assert lengths.tolist() == [3, 0, 4] and full.tolist() == [3, 0, 7]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_word2vec(tmp_path_factory.mktemp("w2v"))


@pytest.mark.parametrize("kind", ["binary", "text", "binary_gz", "text_gz"])
def test_formats_detected_and_rows_equal_file_vectors(files, kind):
    path = getattr(files, kind)
    assert w2v.detect_format(path) == ("binary" if kind.startswith("binary") else "text")
    want = ["dog", "A", "nope", "the", "Dog"]
    for stream in (False, True):
        v = w2v.load_vectors(path, want, stream=stream)
        assert v.words == ["the", "dog", "Dog", "A"]  # file order, exact case
        rows = [W2V_WORDS.index(w) for w in v.words]
        ref = KeyedVectors.load_word2vec_format(str(path), binary=kind.startswith("binary"))
        assert v.vectors.dtype == np.float32
        assert np.array_equal(v.vectors, ref.vectors[rows])
        if kind.startswith("binary"):  # binary stores the float32 values exactly
            assert np.array_equal(v.vectors, files.vectors[rows])
        else:
            np.testing.assert_allclose(v.vectors, files.vectors[rows], rtol=1e-6)
        assert v.info["loader"] == ("stream" if stream else "gensim") and v.info["vectors_in_file"] == len(W2V_WORDS)


@pytest.mark.parametrize("binary", [True, False])
def test_streaming_reader_equals_gensim_whole_vocab_and_limit(files, binary):
    path = files.binary if binary else files.text
    for limit in (None, 5, 1000):
        words, vecs = w2v.stream_vectors(path, W2V_WORDS, binary=binary, limit=limit)
        ref = KeyedVectors.load_word2vec_format(str(path), binary=binary, limit=limit)
        assert words == ref.index_to_key and np.array_equal(vecs, ref.vectors)
        g_words, g_vecs = w2v.gensim_vectors(path, W2V_WORDS, binary=binary, limit=limit)
        assert g_words == words and np.array_equal(g_vecs, vecs)


def test_streaming_text_duplicate_word_keeps_first_like_gensim(tmp_path):
    path = tmp_path / "dup.txt"
    path.write_text("3 2\nb 1.5 2\nb 3 4\nc 0.1 0.7\n")
    words, vecs = w2v.stream_vectors(path, ["b", "c"], binary=False)
    ref = KeyedVectors.load_word2vec_format(str(path))  # (gensim leaves a None slot in index_to_key)
    assert words == ["b", "c"] and np.array_equal(vecs, np.stack([ref["b"], ref["c"]]))
    assert vecs[0].tolist() == [1.5, 2.0]
    g_words, g_vecs = w2v.gensim_vectors(path, None, binary=False)
    assert g_words == words and np.array_equal(g_vecs, vecs)


def test_binary_with_leading_newlines_and_gz_by_magic(tmp_path):
    """The C tool writes '\\n' after each vector; gensim strips it from the next word. gzip found by content."""
    vecs = np.arange(6, dtype=np.float32).reshape(3, 2)
    body = b"3 2\n" + b"".join(w + b" " + v.tobytes() + b"\n" for w, v in zip([b"x", b"y", b"z"], vecs))
    path = tmp_path / "vectors.bin"  # gzip content without a .gz suffix
    path.write_bytes(gzip.compress(body))
    v = w2v.load_vectors(path, ["z", "x"], stream=True, expected_dim=2)
    assert v.words == ["x", "z"] and np.array_equal(v.vectors, vecs[[0, 2]])


def test_wrong_dimension_is_a_clear_error(tmp_path):
    path = tmp_path / "small.bin"
    write_word2vec(path, ["dog", "cat"], binary=True, dim=50)
    with pytest.raises(PrepareError, match=r"small\.bin.*dimension 50, expected 300"):
        w2v.load_vectors(path, ["dog"])
    assert w2v.load_vectors(path, ["dog"], expected_dim=50).vectors.shape == (1, 50)


def test_malformed_files_name_file_and_line(tmp_path):
    bad_header = tmp_path / "h.txt"
    bad_header.write_text("hello world\n")
    with pytest.raises(PrepareError, match=r"h\.txt:1: expected a word2vec header"):
        w2v.load_vectors(bad_header, ["a"])
    short_line = tmp_path / "s.txt"
    short_line.write_text("2 3\na 1 2 3\nb 1 2\n")
    with pytest.raises(PrepareError, match=r"s\.txt:3: expected 3 numbers"):
        w2v.load_vectors(short_line, ["b"], stream=True, expected_dim=3)
    truncated = tmp_path / "t.bin"
    write_word2vec(truncated, ["a", "b", "c"], binary=True, dim=DIM)
    truncated.write_bytes(truncated.read_bytes()[:-500])
    with pytest.raises(PrepareError, match=r"t\.bin: file ends after 2 of 3 vectors"):
        w2v.load_vectors(truncated, ["a"], stream=True)
    with pytest.raises(PrepareError, match=r"t\.bin"):
        w2v.load_vectors(truncated, ["a"], stream=False)
    with pytest.raises(PrepareError, match=r"word2vec file .*missing\.bin: no such file"):
        w2v.load_vectors(tmp_path / "missing.bin", ["a"])


def test_trained_vectors_are_deterministic():
    sentences = [["A", "dog", "runs"], ["the", "dog", "sleeps"], ["A", "cat"]] * 5
    a = w2v.train_vectors(sentences, epochs=2)
    b = w2v.train_vectors(sentences, epochs=2)
    assert a.words == b.words and set(a.words) == {"A", "dog", "runs", "the", "sleeps", "cat"}
    assert a.vectors.shape == (6, 300) and np.array_equal(a.vectors, b.vectors)
    assert a.info["source"] == "trained" and "deviation" in a.info
