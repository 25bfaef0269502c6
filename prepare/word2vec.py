"""word2vec vectors for the paper's dictionary (spec 2.1 step 1 and section 3).

The text CNN's first layer is initialised with the *raw* GoogleNews vectors of the dictionary words (no
normalisation). Two ways to read a word2vec file (binary or text, optionally ``.gz``):

* ``gensim``: ``KeyedVectors.load_word2vec_format`` loads the whole file, then we keep the needed words.
* ``stream``: our own reader walks the file once and keeps only the vectors of the words we need. Because the
  dictionary can only contain training-caption tokens, the needed set is known before loading, so the 3.6 GB
  GoogleNews file never has to be held in memory. It returns exactly gensim's vectors, in file order.

``--word2vec train`` instead trains a gensim Word2Vec model on the training captions (a documented deviation
from the paper, recorded in the manifest).
"""
from __future__ import annotations

import argparse
import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

import numpy as np

from prepare.core import PrepareError

DEFAULT_DIM = 300
STREAM_THRESHOLD_BYTES = 500 * 1024 * 1024
_CHUNK = 1 << 22


@dataclass
class Vectors:
    """Word vectors in dictionary order (the order of the word2vec file): ``vectors[i]`` belongs to ``words[i]``."""

    words: list[str]
    vectors: np.ndarray  # float32 (len(words), dim)
    info: dict = field(default_factory=dict)  # manifest record (source, format, loader, counts)


def _open(path: Path) -> BinaryIO:
    """Open a word2vec file for binary reading; gzip is recognised by its magic bytes."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
        return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")
    except OSError as e:
        raise PrepareError(f"word2vec file {path}: cannot open ({e.strerror or e})") from None


def _read_header(fin: BinaryIO, path: Path) -> tuple[int, int]:
    """Parse the ``<count> <dim>`` first line."""
    try:
        line = fin.readline(1024)
        count, dim = (int(x) for x in line.decode("utf-8").split())
    except (ValueError, UnicodeDecodeError, OSError, EOFError):
        raise PrepareError(f"{path}:1: expected a word2vec header '<count> <dim>', got {line[:60]!r}") from None
    if count < 0 or dim <= 0:
        raise PrepareError(f"{path}:1: invalid word2vec header {line.strip()!r}")
    return count, dim


def read_header(path: str | Path) -> tuple[int, int]:
    """(number of vectors, vector dimension) from a word2vec file's header."""
    with _open(Path(path)) as fin:
        return _read_header(fin, Path(path))


def detect_format(path: str | Path) -> str:
    """'text' if the line after the header is ``word`` + dim decimal numbers, else 'binary'."""
    path = Path(path)
    with _open(path) as fin:
        _, dim = _read_header(fin, path)
        try:
            first = fin.readline(dim * 64 + 4096)
            parts = first.decode("utf-8").rstrip().split(" ")
            if len(parts) == dim + 1:
                [float(x) for x in parts[1:]]
                return "text"
        except (UnicodeDecodeError, ValueError, OSError, EOFError):
            pass
    return "binary"


def _stream_binary(fin: BinaryIO, path: Path, n: int, dim: int, wanted: set[bytes]) -> tuple[list[str], list]:
    """Walk n binary records (``word<space><dim float32>``), keeping the wanted words (first occurrence)."""
    nbytes = dim * 4
    buf, pos, done, words, vecs, seen = b"", 0, 0, [], [], set()
    while done < n:
        i = buf.find(b" ", pos)
        if i == -1 or len(buf) - (i + 1) < nbytes:
            more = fin.read(_CHUNK)
            if not more:
                raise PrepareError(f"{path}: file ends after {done} of {n} vectors (truncated, or wrong header?)")
            buf, pos = buf[pos:] + more, 0
            continue
        word = buf[pos:i].lstrip(b"\n")  # gensim strips a leading newline left from the previous record
        if word in wanted and word not in seen:
            seen.add(word)
            try:
                words.append(word.decode("utf-8"))
            except UnicodeDecodeError:
                raise PrepareError(f"{path}: vector #{done + 1}: word is not valid UTF-8") from None
            vecs.append(np.frombuffer(buf, dtype=np.float32, count=dim, offset=i + 1).copy())
        pos = i + 1 + nbytes
        done += 1
    return words, vecs


def _stream_text(fin: BinaryIO, path: Path, n: int, dim: int, wanted: set[bytes]) -> tuple[list[str], list]:
    """Walk n text lines (``word v1 ... vdim``), parsing numbers only for the wanted words (as gensim does)."""
    words, vecs, seen = [], [], set()
    for done in range(n):
        line = fin.readline()
        if not line:
            raise PrepareError(f"{path}: file ends after {done} of {n} vectors (truncated, or wrong header?)")
        stripped = line.rstrip()
        word = stripped.split(b" ", 1)[0]
        if word in wanted and word not in seen:
            seen.add(word)
            try:
                parts = stripped.decode("utf-8").split(" ")
                vec = np.asarray([np.float32(x) for x in parts[1:]], dtype=np.float32)
            except (UnicodeDecodeError, ValueError):
                raise PrepareError(f"{path}:{done + 2}: expected a word and {dim} decimal numbers") from None
            if vec.shape != (dim,):
                raise PrepareError(f"{path}:{done + 2}: expected {dim} numbers after the word, found {vec.size}")
            words.append(parts[0])
            vecs.append(vec)
    return words, vecs


def stream_vectors(path: str | Path, vocab: Iterable[str], *, binary: bool,
                   limit: int | None = None) -> tuple[list[str], np.ndarray]:
    """Memory-aware reader: the vectors of the words in ``vocab`` present in the file, in file order.

    Equal to gensim's ``load_word2vec_format(path, binary, limit)`` restricted to ``vocab``.
    """
    path = Path(path)
    wanted = {w.encode("utf-8") for w in vocab}
    with _open(path) as fin:
        count, dim = _read_header(fin, path)
        n = count if limit is None else min(count, limit)
        try:
            words, vecs = (_stream_binary if binary else _stream_text)(fin, path, n, dim, wanted)
        except (OSError, EOFError, zlib.error) as e:
            raise PrepareError(f"{path}: cannot read word2vec data ({e})") from None
    return words, (np.stack(vecs) if vecs else np.zeros((0, dim), np.float32))


def gensim_vectors(path: str | Path, vocab: Iterable[str] | None, *, binary: bool,
                   limit: int | None = None) -> tuple[list[str], np.ndarray]:
    """Load the whole file with gensim, then keep the words in ``vocab`` (all words if None), in file order."""
    from gensim.models import KeyedVectors

    try:
        kv = KeyedVectors.load_word2vec_format(str(path), binary=binary, limit=limit)
    except (ValueError, EOFError, OSError, UnicodeDecodeError, AssertionError) as e:
        raise PrepareError(f"{path}: gensim cannot read it as a {'binary' if binary else 'text'} word2vec "
                           f"file ({type(e).__name__}: {e})") from None
    keep = set(vocab) if vocab is not None else None
    rows = [i for i, w in enumerate(kv.index_to_key) if w is not None and (keep is None or w in keep)]
    return [kv.index_to_key[i] for i in rows], np.asarray(kv.vectors[rows], dtype=np.float32)


def load_vectors(path: str | Path, vocab: Iterable[str] | None = None, *, fmt: str = "auto",
                 limit: int | None = None, stream: bool | None = None, expected_dim: int = DEFAULT_DIM) -> Vectors:
    """Vectors of ``vocab``'s words found in a word2vec file, in file order (the paper's dictionary order).

    fmt: 'auto' | 'binary' | 'text'. stream: None = stream when the file is larger than 500 MB.
    Raises PrepareError when the file is missing, malformed or its dimension is not ``expected_dim``.
    """
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"word2vec file {path}: no such file")
    count, dim = read_header(path)
    if dim != expected_dim:
        raise PrepareError(f"{path}: word2vec vectors have dimension {dim}, expected {expected_dim} "
                           f"(the paper uses 300-d GoogleNews vectors; --embedding-dim changes the expectation)")
    if fmt not in ("auto", "binary", "text"):
        raise PrepareError(f"unknown word2vec format {fmt!r}; valid: auto, binary, text")
    fmt = detect_format(path) if fmt == "auto" else fmt
    size = path.stat().st_size
    if stream is None:
        stream = size > STREAM_THRESHOLD_BYTES
    if stream and vocab is None:
        raise PrepareError("the streaming word2vec reader needs the set of words to keep")
    reader = stream_vectors if stream else gensim_vectors
    words, vecs = reader(path, vocab, binary=(fmt == "binary"), limit=limit)
    info = {"source": "file", "path": str(path.resolve()), "format": fmt, "loader": "stream" if stream else "gensim",
            "vectors_in_file": count, "vectors_scanned": count if limit is None else min(count, limit),
            "limit": limit, "dim": dim, "bytes": size}
    return Vectors(words, vecs, info)


def stable_hash(text: str) -> int:
    """Process-independent replacement for ``hash`` (gensim seeds each word vector with hashfxn(seed + word))."""
    return zlib.crc32(text.encode("utf-8"))


def train_vectors(sentences: Sequence[Sequence[str]], *, dim: int = DEFAULT_DIM, algorithm: str = "skipgram",
                  seed: int = 1, epochs: int = 5, window: int = 5) -> Vectors:
    """Deviation from the paper: train word2vec on the training captions (min count 1, one worker, fixed seed).

    Every training token gets a vector, so the dictionary is the whole training vocabulary, ordered by the
    trained model's (frequency) order. Deterministic: workers=1 and a process-independent hash function.
    """
    from gensim.models import Word2Vec

    sentences = [list(s) for s in sentences if len(s)]
    if not sentences:
        raise PrepareError("--word2vec train: the training captions contain no tokens")
    model = Word2Vec(sentences=sentences, vector_size=dim, sg=int(algorithm == "skipgram"), min_count=1,
                     window=window, epochs=epochs, seed=seed, workers=1, hashfxn=stable_hash)
    words = list(model.wv.index_to_key)
    info = {"source": "trained", "algorithm": algorithm, "seed": seed, "epochs": epochs, "window": window,
            "min_count": 1, "dim": dim,
            "deviation": "vectors trained on the training captions, not the paper's GoogleNews word2vec (spec 2.1)"}
    return Vectors(words, np.asarray(model.wv.vectors, dtype=np.float32), info)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The word2vec flags shared by every preparer."""
    g = parser.add_argument_group("word2vec (spec 2.1: dictionary = training tokens found in word2vec)")
    g.add_argument("--word2vec", default=None, metavar="FILE|train",
                   help="word2vec file (binary or text, optionally .gz), e.g. GoogleNews-vectors-negative300.bin.gz; "
                        "or the word 'train' to train 300-d vectors on the training captions instead "
                        "(a deviation from the paper, recorded in the manifest). Required unless --dictionary "
                        "FILE.mat gives the vectors")
    g.add_argument("--word2vec-format", choices=("auto", "binary", "text"), default="auto",
                   help="file format (default: auto-detect from the content)")
    g.add_argument("--word2vec-limit", type=int, default=None, metavar="N",
                   help="read only the first N vectors of the file (gensim limit=)")
    g.add_argument("--word2vec-stream", action=argparse.BooleanOptionalAction, default=None,
                   help="stream the file keeping only the needed vectors (low memory); "
                        "default: stream when the file is larger than 500 MB, else load it with gensim")
    g.add_argument("--embedding-dim", type=int, default=DEFAULT_DIM, metavar="D",
                   help="required vector dimension (default 300, the paper's)")
    g.add_argument("--word2vec-train-algorithm", choices=("skipgram", "cbow"), default="skipgram",
                   help="with --word2vec train: skip-gram or CBOW (default skipgram)")
    g.add_argument("--word2vec-train-epochs", type=int, default=5, metavar="N",
                   help="with --word2vec train: epochs (default 5)")
    g.add_argument("--word2vec-seed", type=int, default=1, metavar="SEED",
                   help="with --word2vec train: random seed (default 1)")


def is_trained(args: argparse.Namespace) -> bool:
    """True when ``--word2vec train`` asks for vectors trained on the captions."""
    return str(args.word2vec) == "train"


def vectors_from_args(args: argparse.Namespace, train_tokens: Sequence[Sequence[str]]) -> Vectors:
    """The vectors for the training vocabulary as the command line asks (file or trained)."""
    if args.word2vec_limit is not None and args.word2vec_limit <= 0:
        raise PrepareError(f"--word2vec-limit must be positive, got {args.word2vec_limit}")
    if is_trained(args):
        return train_vectors(train_tokens, dim=args.embedding_dim, algorithm=args.word2vec_train_algorithm,
                             seed=args.word2vec_seed, epochs=args.word2vec_train_epochs)
    vocab = {t for toks in train_tokens for t in toks}
    return load_vectors(args.word2vec, vocab, fmt=args.word2vec_format, limit=args.word2vec_limit,
                        stream=args.word2vec_stream, expected_dim=args.embedding_dim)
