"""A GIVEN dictionary (word list + word2vec vectors) instead of one built from the training captions.

The released MatConvNet networks index words with the authors' own dictionary: ``fc2f(1,1,v,:)`` belongs to
dictionary word v. Their ``make_dictionary.m`` (dataset/{Flickr30k,MSCOCO,CUHK-PEDES}-prepare) saves one variable
``subset`` with ``subset.names`` (1xV cell of words, in GoogleNews order), ``subset.features`` (300xV single, the
word2vec columns) and ``subset.is_appear`` (counts over the 3M GoogleNews words; unused here). Files:
``flickr30k_dictionary.mat``, ``COCO_dictionary.mat``, ``CUHK-PEDES_dictionary.mat``.

Accepted inputs of ``--dictionary FILE``:

* such a ``.mat`` file (v5/v7 or v7.3): words and vectors both come from it;
* a UTF-8 text file, one word per line (e.g. another prepared directory's ``dictionary.txt``): the vectors are read
  from ``--word2vec`` (every word must be in it).

``dictionary_sha256`` is the SHA-256 of the prepared ``dictionary.txt`` bytes (word + newline per line); preparations,
training checkpoints and converted checkpoints record it, and evaluation refuses a mismatch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prepare.core import PrepareError, check_file, file_record, read_lines


@dataclass
class GivenDictionary:
    words: list[str]
    vectors: np.ndarray | None  # float32 (V, dim), or None for a word list without vectors
    info: dict[str, Any]  # manifest record: path, sha256 (of the file), format, words


def _check_words(words: list[str], where: str) -> None:
    seen: dict[str, int] = {}
    for i, w in enumerate(words, 1):
        if not w or any(c.isspace() for c in w):
            raise PrepareError(f"{where}: word {i} {w!r} is empty or contains whitespace (a token cannot)")
        if w in seen:
            raise PrepareError(f"{where}: word {w!r} appears twice (entries {seen[w]} and {i}); a dictionary maps "
                               f"each word to one index")
        seen[w] = i


def read_given_dictionary(path: str | Path) -> GivenDictionary:
    """Words (and vectors when the file has them) of an authors' ``subset`` .mat or a one-word-per-line file."""
    from prepare import matfile

    path = check_file(path, "--dictionary")
    with open(path, "rb") as f:
        is_mat = f.read(6) == b"MATLAB"
    if is_mat:
        subset = matfile.one(matfile.load(path, ["subset"])["subset"], f"{path}: subset")
        names, feats = subset.get("names"), subset.get("features")
        if not isinstance(names, list) or not all(isinstance(w, str) for w in names):
            raise PrepareError(f"{path}: subset.names must be a cell array of words, got {matfile.describe(names)}")
        if not isinstance(feats, np.ndarray) or feats.ndim != 2 or feats.shape[1] != len(names):
            raise PrepareError(f"{path}: subset.features must be D x {len(names)} (one word2vec column per word "
                               f"of subset.names), got {matfile.describe(feats)}")
        _check_words(names, f"{path}: subset.names")
        vectors = np.ascontiguousarray(feats.T, dtype=np.float32)  # (V, D)
        fmt = "matlab subset (make_dictionary.m)"
    else:
        names = [line.rstrip("\r") for line in read_lines(path, "--dictionary")]
        while names and not names[-1]:
            names.pop()
        _check_words(names, str(path))
        vectors, fmt = None, "word list"
    if not names:
        raise PrepareError(f"{path}: the dictionary has no words")
    return GivenDictionary(names, vectors, {**file_record(path), "format": fmt, "words": len(names)})


def attach_vectors(given: GivenDictionary, vectors_words: list[str], vectors: np.ndarray, source: str) -> None:
    """Fill a word list's vectors from word2vec (every word must be there)."""
    row = {w: i for i, w in enumerate(vectors_words)}
    missing = [w for w in given.words if w not in row]
    if missing:
        raise PrepareError(f"--dictionary {given.info['path']}: {len(missing)} words are not in {source} "
                           f"(e.g. {missing[:5]}); a word list needs the word2vec file its words came from")
    given.vectors = np.ascontiguousarray(vectors[[row[w] for w in given.words]], dtype=np.float32)


def given_dictionary_from_args(args: Any) -> tuple[list[str], np.ndarray, dict[str, Any], dict[str, Any]]:
    """(words, (V, D) float32 vectors, word2vec manifest record, dictionary_source record) for ``--dictionary``."""
    from prepare import word2vec

    given = read_given_dictionary(args.dictionary)
    if given.vectors is None:
        if args.word2vec is None or word2vec.is_trained(args):
            raise PrepareError(f"--dictionary {args.dictionary} is a word list without vectors: pass --word2vec FILE "
                               f"(the word2vec file its words came from), or give the authors' .mat dictionary")
        vec = word2vec.load_vectors(args.word2vec, set(given.words), fmt=args.word2vec_format,
                                    limit=args.word2vec_limit, stream=args.word2vec_stream,
                                    expected_dim=args.embedding_dim)
        attach_vectors(given, vec.words, vec.vectors, str(args.word2vec))
        info = {**vec.info, "used_for": "vectors of the --dictionary words"}
    else:
        if given.vectors.shape[1] != args.embedding_dim:
            raise PrepareError(f"--dictionary {args.dictionary}: vectors have dimension {given.vectors.shape[1]}, "
                               f"expected {args.embedding_dim} (--embedding-dim)")
        info = {"source": "dictionary", "path": given.info["path"], "dim": int(given.vectors.shape[1]),
                "note": "vectors from the --dictionary file (subset.features)"}
    assert given.vectors is not None
    return given.words, given.vectors, info, given.info
