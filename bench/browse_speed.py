"""Benchmark: the retrieval browser (python -m retrieval.browse) on a 5,000-image / 25,000-caption prepared split.

Measures (a) the start-up of ``retrieval.browse.load_index``: load the checkpoint, encode the split
(``engine.encode.encode_split``: whole images + flips, every caption summed over all position shifts) and evaluate it
(``engine.metrics.evaluate_retrieval`` + ``retrieval_ranks``), and (b) the server time of each kind of request,
through Flask's test client in this process (no network): a typed sentence (the text path's forward + 5,000
scores), an image view (25,000 scores + ground-truth ranks), a caption view, an evaluation page, a thumbnail.

Data: the synthetic dataset (``prepare.synthetic --full-captions``, 5,300 images: train 200 / val 100 / test 5,000,
5 captions each) prepared by the real Flickr30k preparer at 72 px, built once under runs/bench_data. Model: the
REAL network at configs/demo.yaml's sizes (ResNet-18, 512-d, text CNN at width 0.25), randomly initialised and saved
as a checkpoint (the weights do not change the amount of work).

``--encode all`` runs the real start-up on the whole split (``load_index``, as the command does). The default
``--encode sample`` encodes only the first ``--sample`` test images and their captions with the real model (the
encoding rate is measured there and the whole split's encoding time extrapolated linearly, labelled as such), then
writes RANDOM features (Gaussian, each caption near its image) for the whole split into the split feature cache and
times ``load_index`` reading it: the real cached start-up (read, evaluate, build the index). The request times do
not depend on the feature values.

    .venv/bin/python bench/browse_speed.py [--encode sample|all] [--sample 320] [--repeats 20] [--no-write]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CACHE, ROOT, add_output_args, report, table, usable_cores  # noqa: E402

from utils.cli import ArgumentParser  # noqa: E402

HEADING = "## 6. Retrieval browser: start-up and request times"


def prepared_split(cache: Path, test: int) -> Path:
    """The synthetic dataset with a ``test``-image test split, prepared at 72 px (built once)."""
    from prepare.flickr30k import main as prepare_flickr30k
    from prepare.synthetic import make_synthetic

    out = cache / f"synthetic_test{test}_s72"
    if (out / "manifest.json").is_file():
        return out
    raw = cache / f"synthetic_raw_test{test}"
    if not (raw / "dataset_flickr30k.json").is_file():
        make_synthetic(raw, images=test + 300, val=100, test=test, overwrite=True, full_captions=True)
    rc = prepare_flickr30k(["--images", str(raw / "images"), "--captions", str(raw / "results_20130124.token"),
                            "--split-json", str(raw / "dataset_flickr30k.json"), "--word2vec",
                            str(raw / "word2vec.bin"), "--out", str(out), "--image-size", "72",
                            "--workers", str(usable_cores()), "--overwrite"])
    if rc != 0:
        raise RuntimeError(f"preparing {raw} failed (exit {rc})")
    return out


def demo_checkpoint(data_dir: Path, out: Path) -> Path:
    """configs/demo.yaml's network sizes, random weights (pretrained none), saved like a training checkpoint."""
    from engine.config import load_config
    from engine.data import Prepared
    from engine.model_io import make_model

    import torch
    data = Prepared(data_dir)
    cfg = load_config(ROOT / "configs" / "demo.yaml", stage=1, overrides={"pretrained": "none"})
    torch.manual_seed(0)
    model, _ = make_model(cfg, data, init=None)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "pretrained_source": "none", "stage": 1,
                "data": {k: data.manifest[k] for k in ("dataset", "num_classes", "vocab_size", "max_len")}}, out)
    return out


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def ms(xs: list[float]) -> tuple[str, str]:
    return f"{1000 * statistics.median(xs):.1f}", f"{1000 * max(xs):.1f}"


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test-images", type=int, default=5000, help="images in the test split (5 captions each)")
    ap.add_argument("--repeats", type=int, default=20, help="requests of each kind (different items)")
    ap.add_argument("--encode", choices=("sample", "all"), default="sample",
                    help="sample: encode --sample images with the model, random features for the full index; "
                         "all: the real start-up on the whole split (default: %(default)s)")
    ap.add_argument("--sample", type=int, default=320, help="images encoded with --encode sample")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the prepared data is built once")
    add_output_args(ap)
    args = ap.parse_args()

    import numpy as np  # after parsing: --help answers at once
    import torch

    from retrieval import browse, browse_index
    from retrieval.browse_app import create_app
    from engine.data import Prepared
    from engine.encode import encode_split
    from engine.metrics import evaluate_retrieval, retrieval_ranks

    data_dir = prepared_split(args.cache, args.test_images)
    ckpt = demo_checkpoint(data_dir, args.cache / "browse_demo_random" / "checkpoint.pt")
    load_args = Namespace(checkpoint=ckpt, data=data_dir, split="test", images=None, top_k=10, no_cache=False,
                          device="cpu", precision="auto", batch_size=64, fold=None)
    if args.encode == "all":
        t0 = time.perf_counter()
        index = browse.load_index(load_args)
        startup = f"**{time.perf_counter() - t0:.1f} s** measured (load_index on the whole split)"
        feats = [index.image_feats, index.caption_feats, index.image_labels, index.caption_labels]
        t0 = time.perf_counter()
        evaluate_retrieval(*feats)
        retrieval_ranks(*feats)
        ranking = time.perf_counter() - t0
    else:
        from engine.model_io import load_model
        from retrieval.index import checkpoint_key
        t0 = time.perf_counter()
        data = Prepared(data_dir)
        model, _ = load_model(ckpt, data, torch.device("cpu"))
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        part = encode_split(model, data, "test", torch.device("cpu"), max_images=args.sample, progress=True)
        t_sample = time.perf_counter() - t0
        rows, caps = data.split_images("test"), data.split_captions("test")
        owner = data.captions["image"].to_numpy()[caps]
        pos = np.searchsorted(rows, owner)  # image position of each caption (rows are sorted)
        rng = np.random.default_rng(0)
        img = rng.standard_normal((len(rows), model.text.fc.out_features)).astype(np.float32)
        txt = img[pos] + 1.5 * rng.standard_normal((len(caps), img.shape[1])).astype(np.float32)
        person = data.images["person"].to_numpy()
        # the random features go into the split cache the command reads, so the cached start-up below is the real
        # load_index (read the cache, evaluate, build the index)
        cache = browse_index.default_split_cache(ckpt, data, "test")
        key = browse_index.split_cache_key(checkpoint_key(ckpt), data, "test", "auto", img.shape[1])
        browse_index.write_split_cache(cache, key, {
            "images": img, "texts": txt, "image_labels": person[rows],
            "text_labels": data.captions["person"].to_numpy()[caps], "image_rows": rows, "caption_rows": caps})
        t0 = time.perf_counter()
        index = browse.load_index(load_args)
        t_cached = time.perf_counter() - t0
        cache.unlink()
        feats = [index.image_feats, index.caption_feats, index.image_labels, index.caption_labels]
        t0 = time.perf_counter()
        evaluate_retrieval(*feats)
        retrieval_ranks(*feats)
        ranking = time.perf_counter() - t0
        n_s, m_s = len(part["images"]), len(part["texts"])
        est = t_sample * len(rows) / n_s
        startup = (f"first start: checkpoint load {t_load:.1f} s (measured) + encoding {n_s} images and their {m_s} "
                   f"captions {t_sample:.1f} s (measured) -> the whole split's encoding ~{est:.0f} s (extrapolated "
                   f"x{len(rows) / n_s:.1f}) + ranking ~{ranking:.0f} s: **~{t_load + est + ranking:.0f} s** "
                   f"estimated; later starts (the split's features read from the cache next to the checkpoint, "
                   f"load_index measured end to end): **{t_cached:.1f} s**")
    n_img, n_cap = len(index.image_paths), len(index.caption_rows)

    client = create_app(index).test_client()
    rng = np.random.default_rng(0)
    img_ids = rng.choice(n_img, args.repeats, replace=False).tolist()
    cap_ids = rng.choice(n_cap, args.repeats, replace=False).tolist()
    sentences = [index.caption_texts[c] for c in cap_ids]

    def get(url: str, **kw) -> None:
        resp = client.get(url, **kw)
        assert resp.status_code == 200, (url, resp.get_data(as_text=True)[:200])

    it = {k: iter(v) for k, v in {"q": sentences, "img": img_ids, "cap": cap_ids, "th": img_ids,
                                  "th2": img_ids}.items()}
    rows = []
    for name, fn in [
        ("typed sentence -> top-10 images (/api/search)",
         lambda: get("/api/search", query_string={"q": next(it["q"])})),
        ("image view: top-10 of 25,000 captions + ground-truth ranks (/api/image/ID)",
         lambda: get(f"/api/image/{next(it['img'])}")),
        ("caption view -> top-10 images (/api/caption/ID)", lambda: get(f"/api/caption/{next(it['cap'])}")),
        ("evaluation page of 20 worst t2i queries (/api/eval)",
         lambda: get(f"/api/eval?direction=t2i&page={int(rng.integers(0, 100))}")),
        ("thumbnail, first request (/image/ID)", lambda: get(f"/image/{next(it['th'])}")),
        ("thumbnail, cached (/image/ID)", lambda: get(f"/image/{next(it['th2'])}")),
    ]:
        get("/api/info")
        rows.append([name, *ms(timed(fn, args.repeats))])
    lines = table(["request (server time in-process, no network)", "median ms", "max ms"], rows)
    feats_note = ("the model's own features" if args.encode == "all" else
                  "RANDOM features (Gaussian 512-d, each caption = its image + noise) for the full-size index, "
                  "given to load_index through its split cache; the text path's forward of typed sentences is the "
                  "real model's")
    notes = [f"Data: {data_dir.relative_to(ROOT) if data_dir.is_relative_to(ROOT) else data_dir} (synthetic, "
             f"Flickr30k formats, prepared at 72 px): test split {n_img} images, {n_cap} captions, max_len "
             f"{index.data.max_len}. Model: configs/demo.yaml sizes (resnet18, feature_dim 512, text_width 0.25), "
             f"random weights, fp32, {torch.get_num_threads()} threads; --encode {args.encode}: {feats_note}.",
             f"Start-up: {startup}. Ranking at full size (evaluate_retrieval + retrieval_ranks): {ranking:.2f} s. "
             f"Each request kind below: {args.repeats} requests for different items, after one warm-up /api/info."]
    report(args, HEADING, f"browser on a {n_img}-image / {n_cap}-caption split, cpu", notes, lines)


if __name__ == "__main__":
    main()
