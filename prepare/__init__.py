"""Dataset preparation: raw files -> one prepared directory (the cache that training and evaluation only read).

One module per dataset (``python -m prepare.flickr30k``, ``prepare.flickr8k``, ``prepare.coco``,
``prepare.cuhk_pedes``) plus ``prepare.synthetic`` (writes a small *raw* dataset in the Flickr30k formats).
They share ``prepare.pipeline`` (the flags, then tokenise, dictionary, index, resize and the atomic write of the
prepared directory and its manifest) on top of ``prepare.core`` (errors, the text pipeline's functions, input
files, digests), ``prepare.word2vec`` and ``prepare.images``; ``--dictionary FILE`` indexes with a given dictionary
instead (``prepare.dictionary``: the authors' ``make_dictionary.m`` .mat, read by ``prepare.matfile``, or a word
list). Imports run one way: ``core`` <- ``word2vec``, ``images``, ``matfile`` <- ``dictionary`` <- ``pipeline`` <-
the dataset modules. Only ``prepare.synthetic_backbone`` (the demo's stand-in for ImageNet weights) imports the
models; the MatConvNet converter is the package ``matconvnet``, above this one.

The prepared directory (format version 1)::

    manifest.json     {"format_version": 1, "dataset", "num_classes", "vocab_size", "max_len", "embedding_dim",
                       "match": "image" | "person", "image_resize": {"mode": "short_side" | "square", "size": 256},
                       "splits": {"train": {"images", "captions"}, "val": {...}, "test": {...}},
                       "warnings": {name: {"count": n, "examples": [...]}}, "args": {...},
                       "inputs": {role: {"path", "sha256", "bytes"}}, "created": ISO time,
                       "dictionary_sha256": sha256 of dictionary.txt's bytes (checkpoints record it; evaluation
                       refuses a mismatch), "dictionary_source": "train captions only" or the --dictionary file}
    images.parquet    one row per image, in a fixed order (train first, then val, then test; within a split the
                      dataset's own order, e.g. sorted file names for Flickr30k):
                        file (str, path under images/), source (str, raw path relative to the image root),
                        split (str), label (int64, class 0..N-1 for train, -1 for val/test),
                        person (int64: CUHK-PEDES identity; elsewhere equal to the image's row index)
    captions.parquet  one row per caption, grouped by image in image order:
                        image (int64, row in images.parquet), k (int64, caption number within its image, 0-based),
                        split, label (class of its image/person, -1 for val/test), person (as its image),
                        raw (str, the original caption text), length (int64, number of kept words <= max_len)
    tokens.npy        int32 (num_captions, max_len): 1-based dictionary indices of the first max_len kept words,
                      left-aligned, 0 = padding. Row i belongs to captions.parquet row i.
    dictionary.txt    V lines; line v (1-based) is the word with index v (order: order of the word2vec file).
    word2vec.npy      float32 (V, 300); row v-1 is the word2vec vector of word v (raw, no normalisation).
    images/           the resized images (JPEG), paths as in images.parquet ``file``.

Evaluation labels: a caption matches an image when their ``person`` values are equal (CUHK-PEDES: identity;
Flickr/COCO: the image's own row index, so exactly one image matches).
"""
