"""Search with your own query: a sentence -> images of a folder, or an image -> captions of a prepared split.

    python -m retrieval.search --checkpoint runs/x/checkpoint_best.pt --data data/flickr30k \\
        --images ~/photos --query "a dog runs on the grass" --query "two men walking" [--top-k 5] [--json out.json]
    python -m retrieval.search --checkpoint runs/x/checkpoint_best.pt --data data/flickr30k \\
        --image ~/photos/dog.jpg [--split test] [--top-k 5]

Images are prepared as the preparer did (shorter side -> the manifest's ``image_resize.size``, or a square for mode
"square"; bicubic) and encoded with the test-time feature (``ImageCNN.test_feature``: whole image + its mirror).
A folder is encoded once: the features are cached in an .npz (default ``FOLDER/.dualpath_cache_<hash>.npz``, the
hash naming the checkpoint file and its modification time) keyed by file path, modification time and size, so a
later run re-encodes only new or changed images. Sentences are tokenised with the preparer's own functions
(``prepare.core.tokenize`` / ``index_captions``) and the prepared dictionary; words outside it are dropped and
reported. Ranking: cosine similarity of the test-time features.

Python API (implemented in ``retrieval/index.py``, re-exported here): ``encode_folder``, ``search_text``,
``encode_captions``, ``search_image``, ``tokenize_query``,
``encode_query``; ``engine.model_io.load_model`` rebuilds the model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from utils.cli import ArgumentParser, UserError, check_model_inputs, resolve_device, run_guarded

if TYPE_CHECKING:
    import torch

# The Python API of retrieval.search, re-exported from retrieval.index on first use (PEP 562), so that the command
# line parses its arguments before torch, torchvision and the models are imported (docs/cli.md).
API = ("IMAGE_SUFFIXES", "CACHE_VERSION", "SearchError", "QueryError", "top_k", "model_fingerprint", "checkpoint_key",
       "default_image_cache", "default_caption_cache", "list_images", "load_image", "encode_images", "encode_folder",
       "Vocabulary", "vocabulary", "QueryTokens", "tokenize_query", "encode_query", "search_text", "encode_captions",
       "rank_captions", "search_image")
__all__ = ["build_parser", "check_args", "main", "run", *API]


def __getattr__(name: str) -> Any:
    if name in API:
        from . import index
        return getattr(index, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m retrieval.search",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Search with your own query using a trained dual-path model:\n"
                    "  sentences -> images of a folder (--query TEXT with --images FOLDER), or\n"
                    "  an image -> captions of a prepared split (--image PATH).\n"
                    "Ranking: cosine similarity of the test-time features; image features of the folder are "
                    "cached.",
        epilog="examples:\n"
               "  python -m retrieval.search --checkpoint runs/f30k_s2/checkpoint_best.pt --data data/flickr30k \\\n"
               "      --images ~/photos --query \"a dog runs on the grass\" --query \"two men walking\"\n"
               "  python -m retrieval.search --checkpoint runs/f30k_s2/checkpoint_best.pt --data data/flickr30k \\\n"
               "      --image ~/photos/dog.jpg --top-k 10\n"
               "exit status: 0 success, 2 bad arguments or input (the message says what was expected).")
    p.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT",
                   help="a training checkpoint (checkpoint_best.pt / checkpoint_last.pt of a Stage I or II run)")
    p.add_argument("--data", required=True, type=Path, metavar="PREPARED_DIR",
                   help="the prepared directory the model was trained on (its dictionary.txt tokenises the "
                        "queries; its manifest gives the image size; --image searches its captions)")
    p.add_argument("--query", action="append", default=[], metavar="TEXT",
                   help="a sentence to search the --images folder with (repeat for several). Split like the "
                        "training captions (whitespace and -.,() ), case-sensitive; words not in the dictionary "
                        "are dropped and reported, a query without any known word is an error")
    p.add_argument("--images", type=Path, metavar="FOLDER",
                   help="folder of .jpg/.jpeg/.png images searched by --query (recursive); encoded once, then "
                        "cached (see --cache)")
    p.add_argument("--image", action="append", default=[], type=Path, metavar="PATH",
                   help="an image to find captions for among the captions of --split (repeat for several)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="prepared split whose captions --image searches (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="results per query (default: %(default)s)")
    p.add_argument("--cache", type=Path, metavar="FILE",
                   help="feature cache (.npz) for the --images folder (default: FOLDER/.dualpath_cache_<hash>.npz, "
                        "the hash naming the checkpoint file and its modification time); entries are keyed by "
                        "file path, modification time and size, so only new or changed images are re-encoded")
    p.add_argument("--caption-cache", type=Path, metavar="FILE",
                   help="feature cache (.npz) for the --split captions (default: next to the checkpoint, "
                        ".dualpath_captions_<split>_<hash>.npz)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write any feature cache")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results to this JSON file")
    add_encoding_args(p, batch_size=32)
    return p


def add_encoding_args(p: argparse.ArgumentParser, batch_size: int) -> None:
    """--device, --precision, --batch-size: how a loaded model encodes (search and the browser)."""
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=("auto", "bf16", "fp16", "fp32"),
                   help="encoding precision (default: %(default)s, as evaluate.py; TF32 matmuls on CUDA; bf16/fp16: "
                        "autocast; auto = bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=batch_size, metavar="N",
                   help="images per forward pass (default: %(default)s)")


def check_args(args: argparse.Namespace) -> None:
    """The checks that need no model (nor torch): a mistake here costs no import time. Raises UserError."""
    if not args.query and not args.image:
        raise UserError("nothing to search: give --query TEXT (with --images FOLDER) and/or --image PATH")
    if args.query and args.images is None:
        raise UserError("--query needs --images FOLDER (the images to search)")
    if args.images is not None and not args.query:
        raise UserError("--images FOLDER is searched with --query TEXT; none was given")
    if args.top_k < 1:
        raise UserError(f"--top-k {args.top_k}: expected a positive number of results")
    check_model_inputs(args.checkpoint, args.data)
    for img in args.image:
        if not img.is_file():
            raise UserError(f"--image {img}: no such file (expected a .jpg/.jpeg/.png image)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything after parsing; raises UserError (SearchError, a data or checkpoint error) on bad input."""
    check_args(args)
    import models  # noqa: F401  (first: installs the torchvision guard)

    from utils.files import write_json
    from engine.data import Prepared
    from engine.model_io import load_model
    from .cache import checkpoint_key, default_caption_cache, default_image_cache
    from .index import (encode_captions, encode_folder, list_images, load_image, rank_captions, search_text,
                        tokenize_query, vocabulary)

    paths = list_images(args.images) if args.images is not None else []
    data = Prepared(args.data)
    queries = [tokenize_query(data, q) for q in args.query]  # fail fast, before loading anything big
    resize = data.manifest["image_resize"]
    for img in args.image:  # a file that is no image is refused here, not after the captions are encoded
        load_image(img, int(resize["size"]), resize["mode"])
    device = resolve_device(args.device)
    model, _ = load_model(args.checkpoint, data, device)  # CheckpointError / CheckpointMismatch name the file
    ckey = checkpoint_key(args.checkpoint)
    vocab = vocabulary(data)
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "data": str(args.data), "top_k": args.top_k,
                              "text_queries": [], "image_queries": []}
    if queries:
        cache = None if args.no_cache else (args.cache or default_image_cache(args.images, args.checkpoint))
        paths, feats = encode_folder(model, args.images, int(resize["size"]), resize["mode"], device, cache,
                                     cache_key=ckey, precision=args.precision, batch_size=args.batch_size)
        for n, q in enumerate(queries, 1):
            hits = search_text(model, data, q, paths, feats, args.top_k, device, args.precision)
            print(f'\nquery {n}: "{q.query}"')
            if q.ignored:
                print("  " + q.ignored_message(vocab))
            if q.truncated:
                print(f"  only the first {data.max_len} known words are used ({q.truncated} dropped)")
            print(f"  {'rank':>4}  {'score':>7}  image")
            for r, (p, s) in enumerate(hits, 1):
                print(f"  {r:>4}  {s:>7.4f}  {p}")
            result["text_queries"].append({
                "query": q.query, "words": q.words, "ignored": q.ignored, "truncated": q.truncated,
                "results": [{"rank": r, "path": str(p), "score": s} for r, (p, s) in enumerate(hits, 1)]})
    if args.image:
        ccache = None if args.no_cache else (args.caption_cache or
                                             default_caption_cache(args.checkpoint, data, args.split))
        captions = encode_captions(model, data, args.split, device, ccache, cache_key=ckey,
                                   precision=args.precision)
        for n, img in enumerate(args.image, 1):
            hits = rank_captions(model, data, img, args.top_k, args.split, device, captions, precision=args.precision)
            print(f"\nimage {n}: {img}  ({args.split} captions)")
            print(f"  {'rank':>4}  {'score':>7}  caption  [its image]")
            for h in hits:
                print(f"  {h['rank']:>4}  {h['score']:>7.4f}  {h['caption']}  [{h['image_file']}]")
            result["image_queries"].append({"image": str(img), "split": args.split, "results": hits})
    if args.json:
        write_json(result, args.json)
        print(f"\nresults written to {args.json}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        run(args)

    return run_guarded(body)


if __name__ == "__main__":
    sys.exit(main())
