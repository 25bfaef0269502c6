"""A small NumPy implementation of the MatConvNet operations (tests only): runs a DagNN, by its own wiring, in
``net.mode = 'test'`` on H x W x C x N arrays, and the original test scripts' feature extraction.

Semantics (reference matconvnet_models.md section 5): conv = cross-correlation with zero padding
[top bottom left right] and output floor((H + Pt + Pb - h) / S) + 1; BatchNorm in test mode =
mult / sigma * (x - mu) + bias with the stored moments [mu, sigma] (no eps added); max pooling ignores padded
cells (-inf); average pooling divides by the clipped window; DropOut is the identity; Sum adds.
"""
from __future__ import annotations

import numpy as np


def conv(x: np.ndarray, f: np.ndarray, b: np.ndarray | None, stride: int, pad: tuple[int, ...]) -> np.ndarray:
    """x (H, W, C, N), f (h, w, C, K) -> (H', W', K, N)."""
    h, w = f.shape[:2]
    t, bo, l, r = pad
    xp = np.pad(x, ((t, bo), (l, r), (0, 0), (0, 0)))
    ho = (xp.shape[0] - h) // stride + 1
    wo = (xp.shape[1] - w) // stride + 1
    out = np.zeros((ho, wo, f.shape[3], x.shape[3]), dtype=np.float64)
    for dy in range(h):
        for dx in range(w):
            patch = xp[dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride]  # (ho, wo, C, N)
            out += np.einsum("ijcn,ck->ijkn", patch, f[dy, dx])
    if b is not None:
        out += b.reshape(1, 1, -1, 1)
    return out


def pool(x: np.ndarray, size: tuple[int, int], stride: int, pad: tuple[int, ...], method: str) -> np.ndarray:
    ph, pw = size
    t, bo, l, r = pad
    fill = -np.inf if method == "max" else np.nan
    xp = np.pad(x, ((t, bo), (l, r), (0, 0), (0, 0)), constant_values=fill)
    ho = (xp.shape[0] - ph) // stride + 1
    wo = (xp.shape[1] - pw) // stride + 1
    out = np.zeros((ho, wo) + x.shape[2:], dtype=np.float64)
    for i in range(ho):
        for j in range(wo):
            win = xp[i * stride:i * stride + ph, j * stride:j * stride + pw]
            out[i, j] = win.max(axis=(0, 1)) if method == "max" else np.nanmean(win, axis=(0, 1))
    return out


def _num(block: dict, key: str, n: int) -> list[int]:
    v = np.asarray(block[key], dtype=np.float64).ravel()
    return [int(a) for a in (np.repeat(v, n) if v.size == 1 else v)]


def run(layers: list[dict], params: dict[str, np.ndarray], inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    """Evaluate the DAG (layers in order; only those whose inputs are available) until ``output`` exists."""
    vals = {k: np.asarray(v, dtype=np.float64) for k, v in inputs.items()}
    for layer in layers:
        if output in vals:
            break
        ins = list(layer["inputs"])
        if not all(i in vals for i in ins):
            continue
        kind, block, p = layer["type"], layer["block"], [params[n].astype(np.float64) for n in layer["params"]]
        x = vals[ins[0]]
        if kind == "dagnn.Conv":
            size = _num(block, "size", 4)
            y = conv(x, p[0].reshape(size, order="F"), p[1] if len(p) > 1 else None, _num(block, "stride", 2)[0],
                     tuple(_num(block, "pad", 4)))
        elif kind == "dagnn.BatchNorm":
            mu, sigma = p[2][:, 0], p[2][:, 1]
            y = (x - mu.reshape(1, 1, -1, 1)) * (p[0].ravel() / sigma).reshape(1, 1, -1, 1) \
                + p[1].reshape(1, 1, -1, 1)
        elif kind == "dagnn.ReLU":
            y = np.maximum(x, 0)
        elif kind == "dagnn.Pooling":
            y = pool(x, tuple(_num(block, "poolSize", 2)), _num(block, "stride", 2)[0], tuple(_num(block, "pad", 4)),
                     block["method"])
        elif kind == "dagnn.Sum":
            y = sum(vals[i] for i in ins)
        elif kind == "dagnn.DropOut":
            y = x
        else:
            continue  # losses, LRN, RankLoss: not on the test-feature paths
        vals[layer["outputs"][0]] = y
    return vals[output]


def image_feature(layers: list[dict], params: dict, image: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """test/extract_pic_feature_word2_plus_52.m: (image - mean) -> fc1_1bn, summed over positions, + fliplr."""
    x = image.astype(np.float64) - np.asarray(mean, dtype=np.float64).reshape(1, 1, 3)  # (H, W, 3)
    total = 0
    for im in (x, x[:, ::-1]):
        total = total + run(layers, params, {"data": im[..., None]}, "fc1_1bn").sum(axis=(0, 1))[:, 0]
    return total


def text_feature(layers: list[dict], params: dict, ids: list[int], vocab: int, max_len: int) -> np.ndarray:
    """One-hot 1 x L x V maps for every left offset kk = 0 .. L - len, run to fc5_2bn, summed over offsets."""
    n = len(ids)
    maps = np.zeros((1, max_len, vocab, max_len + 1 - n))
    for kk in range(max_len + 1 - n):
        for j, v in enumerate(ids):
            maps[0, kk + j, v - 1, kk] = 1.0
    return run(layers, params, {"data2": maps}, "fc5_2bn").sum(axis=(0, 1, 3))
