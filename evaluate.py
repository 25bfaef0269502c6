"""Evaluate image<->text retrieval with the paper's protocols (spec section 8).

    # any model: precomputed embeddings (npz with images, texts, image_labels, text_labels)
    python evaluate.py --embeddings feats.npz [--coco-1k] --out results.json
    # a checkpoint on a prepared split, with the test-time augmentation of spec 8.1
    python evaluate.py --checkpoint runs/f30k/stage2/checkpoint_last.pt --data data/flickr30k --split test \\
        --out runs/f30k/stage2/results_test.json [--compare-paper flickr30k/resnet50/stage2] [--visualize 5]
    # the demo's protocol: the mean over 5 folds of 50 test images (MSCOCO 1K's rule at a small size)
    python evaluate.py --checkpoint runs/demo/stage2/checkpoint_last.pt --data runs/demo/prepared --folds 5 \
        --out runs/demo/stage2/results_test.json
    # print several results files side by side (the demo's, as scripts/demo.sh writes them)
    python evaluate.py --table runs/demo/stage1/results_test.json runs/demo/stage2/results_test.json

Nothing is selected or tuned here: one checkpoint in, its numbers out. Model selection happens during training on
the val split only (checkpoint_best.pt).

Exit status: 0 success, 2 bad input (one line on stderr: error: ..., naming the file).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from utils.cli import ArgumentParser, UserError, run_guarded

# torch is imported after parsing, torchvision and the models only with --checkpoint (docs/cli.md)
RESULT_KEYS = ("R@1", "R@5", "R@10", "medr", "meanr")
EMBEDDING_ARRAYS = ("images", "texts", "image_labels", "text_labels")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--embeddings", help="npz with images (N,D), texts (M,D), image_labels (N,), text_labels (M,);"
                                          " a text matches an image when their labels are equal")
    src.add_argument("--checkpoint", help="a training checkpoint (checkpoint_last.pt or checkpoint_best.pt)")
    src.add_argument("--table", nargs="+", metavar="RESULTS_JSON", help="print results files side by side")
    p.add_argument("--data", help="prepared directory (with --checkpoint)")
    p.add_argument("--split", default="test", choices=("val", "test"), help="split to encode (default: test)")
    folds = p.add_mutually_exclusive_group()
    folds.add_argument("--coco-1k", action="store_true",
                       help="MSCOCO 1K protocol: mean over 5 folds of 1,000 consecutive images with their own "
                            "captions (= --folds 5 on the 5,000 test images)")
    folds.add_argument("--folds", type=int, default=None, metavar="K",
                       help="mean over K equal folds of consecutive images, each with only its own images' captions "
                            "(the demo: 5 folds of 50 test images); default: the whole split at once")
    p.add_argument("--first-k", type=int, default=None, metavar="K",
                   help="use only the first K captions of each image (COCO's usual 5; default: all, as the "
                        "original code)")
    p.add_argument("--directions", default=None, choices=("both", "t2i"),
                   help="default: t2i only for identity-matched data (CUHK-PEDES), else both")
    p.add_argument("--out", help="results JSON to write (atomically)")
    p.add_argument("--compare-paper", metavar="ROW", help="print paper vs ours for a row of configs/paper_results.yaml")
    p.add_argument("--visualize", type=int, default=0, metavar="K",
                   help="write PNG grids of the top-K results for a few queries next to --out and to TensorBoard")
    p.add_argument("--save-embeddings", metavar="NPZ", help="also save the encoded features (--checkpoint)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoding batch (default 64)")
    p.add_argument("--precision", default="fp32", choices=("auto", "bf16", "fp16", "fp32"),
                   help="encoding precision (default fp32, the paper's; on CUDA with TF32 matmuls, which the "
                        "paper's GPUs did not have; bf16/fp16: autocast; auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    args = p.parse_args(argv)
    if args.coco_1k:
        args.folds = 5
    if args.folds is not None and args.folds < 2:
        p.error(f"--folds {args.folds}: expected an integer >= 2 (without --folds: the whole split at once)")
    if args.checkpoint and not args.data:
        p.error("--checkpoint needs --data PREPARED_DIR")
    for flag, value in (("--visualize", args.visualize), ("--save-embeddings", args.save_embeddings)):
        if value and not args.checkpoint:
            p.error(f"{flag} needs --checkpoint (it uses the prepared images / writes the encoded features)")
    if args.first_k is not None and not args.checkpoint:
        p.error("--first-k needs --checkpoint (saved embeddings do not record which caption of its image each is)")
    return args


def load_embeddings(path: str) -> dict[str, np.ndarray]:
    """The four arrays of an embeddings npz, checked: images (N, D), texts (M, D), image_labels (N,), text_labels (M,)
    with integer labels. Raises UserError naming the file and what was expected."""
    expected = "an .npz with images (N, D), texts (M, D), image_labels (N,), text_labels (M,)"
    if not Path(path).is_file():
        raise UserError(f"--embeddings {path}: no such file (expected {expected})")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"--embeddings {path}: not readable as {expected} ({e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UserError(f"--embeddings {path}: a single array, expected {expected}")
    with z:
        missing = sorted(set(EMBEDDING_ARRAYS) - set(z.files))
        if missing:
            raise UserError(f"--embeddings {path}: missing arrays {missing} (has {z.files}); expected {expected}")
        try:
            feats = {k: z[k] for k in EMBEDDING_ARRAYS}
        except (OSError, ValueError) as e:  # a truncated or object array
            raise UserError(f"--embeddings {path}: unreadable array ({e})") from None
    img, txt, il, tl = (feats[k] for k in EMBEDDING_ARRAYS)
    shapes = {k: v.shape for k, v in feats.items()}
    if (img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1] or il.shape != img.shape[:1]
            or tl.shape != txt.shape[:1] or 0 in img.shape or 0 in txt.shape):
        raise UserError(f"--embeddings {path}: shapes {shapes}; expected {expected}, N, M, D > 0")
    bad = [k for k in EMBEDDING_ARRAYS if not (np.issubdtype(feats[k].dtype, np.integer) if k.endswith("labels")
                                               else np.issubdtype(feats[k].dtype, np.floating))]
    if bad:
        raise UserError(f"--embeddings {path}: arrays {bad} have dtypes {[str(feats[k].dtype) for k in bad]}; "
                        f"expected floating-point features and integer labels")
    return feats


def check_writable(flag: str, path: Path) -> None:
    """``path`` can be written: its nearest existing ancestor is a writable directory (the rest is created)."""
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: cannot be written ({parent} is not a writable directory)")


def check_paper_row(row: str) -> None:
    """Fail before any encoding when --compare-paper names no row of configs/paper_results.yaml."""
    from engine.paper import DEFAULT_PATH, load_paper_rows
    rows = load_paper_rows()
    if row not in rows:
        raise UserError(f"--compare-paper {row}: not a row of {DEFAULT_PATH}; available rows: {list(rows)}")


def protocol_name(dataset: str, split: str, n_images: int, folds: int | None, first_k: int | None) -> str:
    """Names shared with configs/paper_results.yaml, so a results file is never compared with the wrong row."""
    caps = "" if first_k is None else f"-first{first_k}caps"
    if dataset == "coco" and split == "test" and n_images == 5000 and folds in (None, 5):
        return ("coco-1k" if folds == 5 else "coco-5k") + caps
    if folds is None and dataset == "coco" and split == "test":
        return f"coco-{n_images}img" + caps
    if folds is None and dataset == "cuhk_pedes" and split == "test":
        return "cuhk-pedes-test" + caps
    if folds is None and dataset in ("flickr30k", "flickr8k") and n_images == 1000:
        return f"{dataset}-1k-{split}" + caps
    return f"{dataset}-{n_images}img-{split}" + (f"-{folds}fold" if folds else "") + caps


def score(feats: dict, folds: int | None, directions: tuple[str, ...]) -> dict:
    import torch

    from engine.metrics import evaluate_folds, evaluate_retrieval
    t = {k: torch.as_tensor(np.asarray(feats[k])) for k in ("images", "texts", "image_labels", "text_labels")}
    args = (t["images"].float(), t["texts"].float(), t["image_labels"], t["text_labels"])
    if folds:
        return evaluate_folds(*args, folds=folds, directions=directions)
    return evaluate_retrieval(*args, directions=directions)


def from_checkpoint(args: argparse.Namespace) -> tuple[dict, dict]:
    import torch

    import models  # noqa: F401  (installs the torchvision guard first)
    from engine.data import Prepared
    from engine.encode import encode_split
    from engine.model_io import load_model
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = Prepared(args.data)
    model, state = load_model(args.checkpoint, data, device)
    t0 = time.perf_counter()
    feats = encode_split(model, data, args.split, device, batch_size=args.batch_size, precision=args.precision,
                         first_k=args.first_k)
    meta = {"checkpoint": str(Path(args.checkpoint).resolve()), "stage": state.get("stage"),
            "epoch": state.get("epoch"), "complete": state.get("complete"),
            "pretrained_source": state.get("pretrained_source"), "config": state.get("config"),
            "data": str(Path(args.data).resolve()), "dataset": data.manifest["dataset"],
            "match": data.manifest.get("match", "image"), "encode_seconds": round(time.perf_counter() - t0, 2),
            "split_mode": data.manifest.get("split_mode"),
            "dictionary_rule": data.manifest.get("text", {}).get("dictionary_rule", "train"),
            "_data": data}
    return feats, meta


def print_table(paths: list[str]) -> str:
    """Results files side by side, then the chance level of each split size they were measured on (a split of N
    images with c captions each; for fold-averaged results, one fold's size: the chance of the mean is the mean of
    equal chances)."""
    rows: list[str] = []
    sizes: dict[tuple[int, int], None] = {}
    for p in paths:
        try:
            r = json.loads(Path(p).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"--table {p}: expected a results JSON written by evaluate.py --out ({e})") from None
        if not isinstance(r, dict):
            raise UserError(f"--table {p}: expected a results JSON written by evaluate.py --out (a mapping)")
        label = f"{r.get('dataset', '?')} stage {r.get('stage', '?')} ({r.get('protocol', r.get('split', '?'))})"
        rows.append(table_row(label, r))
        n, m = r.get("num_images"), r.get("num_texts")
        k = len(r["folds"]) if isinstance(r.get("folds"), list) else 1
        if isinstance(n, int) and isinstance(m, int) and n > 0 and m % n == 0 and k > 0 and n % k == 0:
            sizes.setdefault((n // k, m // n), None)
    from engine.chance import chance_level  # torch-free
    for n, c in sizes:  # what a model that ranks at random scores on each split size
        rows.append(table_row(f"chance ({n} images, {c} captions each)", chance_level(n, c)))
    head = "| run | " + " | ".join(f"{d} {k}" for d in ("i2t", "t2i") for k in RESULT_KEYS) + " | rsum |"
    sep = "|" + "---|" * (2 + 2 * len(RESULT_KEYS))
    return "\n".join([head, sep, *rows])


def table_row(label: str, r: dict) -> str:
    cells = [f"{r[d][k]:.1f}" if d in r and k in r[d] else "–" for d in ("i2t", "t2i") for k in RESULT_KEYS]
    return f"| {label} | " + " | ".join(cells) + f" | {r.get('rsum', float('nan')):.1f} |"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_guarded(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    """Everything after parsing; a UserError (or OSError) names the file that is wrong, anything else is a bug."""
    if args.table:
        print(print_table(args.table))
        return 0
    if args.compare_paper:
        check_paper_row(args.compare_paper)
    for flag, out in (("--out", args.out), ("--save-embeddings", args.save_embeddings)):
        if out:
            check_writable(flag, Path(out))  # fail before encoding, not after
    if args.embeddings:
        feats = load_embeddings(args.embeddings)
        meta = {"embeddings": str(Path(args.embeddings).resolve()), "dataset": "embeddings", "match": "label"}
    else:
        feats, meta = from_checkpoint(args)
        if args.save_embeddings:
            from utils.files import atomic_write
            with atomic_write(args.save_embeddings) as f:
                np.savez(f, **{k: feats[k] for k in EMBEDDING_ARRAYS})
    data = meta.pop("_data", None)
    directions = {"both": ("i2t", "t2i"), "t2i": ("t2i",), None: None}[args.directions]
    if directions is None:
        directions = ("t2i",) if meta.get("match") == "person" else ("i2t", "t2i")
    n_img = len(feats["images"])
    try:
        results = score(feats, args.folds, directions)
    except UserError as e:  # labels without a match, --folds / --coco-1k on a size that is not K equal folds
        source = (f"--embeddings {args.embeddings}" if args.embeddings
                  else f"--checkpoint {args.checkpoint} on {args.data}")
        raise UserError(f"{source}: {e}") from None
    results.update(meta, split=args.split if args.checkpoint else None, num_images=n_img,
                   num_texts=len(feats["texts"]),
                   captions=("all" if args.first_k is None else f"first {args.first_k}"),
                   protocol=protocol_name(meta["dataset"], args.split, n_img, args.folds, args.first_k))
    print(print_table_from(results))
    if args.compare_paper:
        from engine.paper import compare_with_paper
        print(compare_with_paper(results, args.compare_paper))
    if args.out:
        from utils.files import write_json
        write_json(results, args.out)
        print(f"wrote {args.out}")
    if args.visualize and data is not None:
        from engine.visualize import retrieval_figures, save_png
        out_dir = Path(args.out).parent if args.out else Path(".")
        figs = retrieval_figures(feats, data, k=args.visualize)
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out_dir / "tb"))
        for name, arr in figs.items():
            png = out_dir / f"retrieval_{args.split}_{name}.png"
            save_png(arr, png)
            writer.add_image(f"{args.split}/{name}", arr, 0, dataformats="HWC")
            print(f"wrote {png}")
        writer.close()
    return 0


def print_table_from(results: dict) -> str:
    lines = [f"{results['protocol']}: {results['num_images']} images, {results['num_texts']} captions "
             f"({results['captions']})", "| direction | R@1 | R@5 | R@10 | Med r | mean r |", "|---|---|---|---|---|---|"]
    for d in ("i2t", "t2i"):
        if d in results:
            r = results[d]
            lines.append(f"| {d} | {r['R@1']:.1f} | {r['R@5']:.1f} | {r['R@10']:.1f} | {r['medr']:g} | "
                         f"{r['meanr']:.1f} |")
    lines.append(f"rsum {results['rsum']:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
