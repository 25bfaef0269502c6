"""The synthetic world's ImageNet: pretrain an image backbone on scene attributes and single objects, for the demo.

Stage I of the paper freezes an ImageNet-pretrained image CNN and trains only what sits on top of it. No ImageNet
weights can be downloaded here, and a randomly initialised frozen ResNet-18 does not see the synthetic shapes'
colours (a linear probe on its pooled features predicts "colour c is in the scene" at the base rate), so the demo
needs a backbone that was pretrained on *something*. This module makes one, reproducibly and offline::

    python -m prepare.synthetic_backbone --out FILE.pth [--exclude RAW_DIR/scenes.json] [--arch resnet18
        --size 64 --images 3000 --holdout 500 --steps 600 --batch 32 --lr 2e-3 --seed 0 --device auto]

It renders its own pool of synthetic scenes (``prepare.synthetic``'s renderer, an independent random stream; with
``--exclude`` no scene whose (shape, colour, size) multiset occurs in that dataset, so the demo's val/test scenes are
never seen), resized as the preparer resizes the demo's images (shorter side ``size``), and trains the
torchvision backbone from scratch on two tasks at once, with no captions:

* scene crops (``size`` px, cut and flipped as Stage I cuts its training crops: 64-100 % of the area, aspect 3/4 to
  4/3) -> 175 attribute labels, multi-label binary cross-entropy: which (colour, shape, size) triples, (colour, shape)
  pairs, colours, shapes, sizes and cells of the crop's 3x3 grid hold an object, how many objects, which background;
* object crops (``size`` / 2 px around one object, at the same scale) -> its shape, colour and size (three softmax
  heads), like ImageNet's object-centred photos. Without them a ResNet-18 at 64 px learns colours, positions and
  counts but not shapes in the demo's budget (held-out shape presence at its base rate after 600 steps).

Both heads are rows of the one ``fc`` layer (175 + 16 outputs), so the file is a plain torchvision state dict (the
pipeline ignores ``fc``). At the end the BatchNorm running statistics are re-estimated on scene crops only: Stage I
keeps them (``backbone_bn: paper``) and uses them on whole scenes, so statistics of a mixture with object crops would
shift every image feature in a common direction (measured: that made image->text retrieval near chance while
text->image worked). Writes ``FILE.pth`` and ``FILE.pth.json`` (the recipe and the held-out accuracy per label group
against its base rate), both atomically. Adam with a one-cycle schedule; uses the GPU when there is one.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from utils.cli import ArgumentParser, InvalidValue, resolve_device, run_guarded
from utils.files import atomic_write, write_json

from .images import original_crop_box, target_size
from .synthetic import BACKGROUNDS, COLOURS, GRID, SHAPES, SIZES, Shape, make_scenes, render, scene_identity

if TYPE_CHECKING:
    import torch

# torch and models.image_cnn (torchvision) are imported inside the functions that use them, so that --help and
# argument errors answer before they load (utils/cli.py). The names of models.image_cnn.ARCHS this module trains
# (test_synthetic_backbone pins that they are there):
ARCHS = ("resnet18", "resnet50", "resnet152")
_C, _S, _Z, _B = len(COLOURS), len(SHAPES), len(SIZES), len(BACKGROUNDS)
GROUPS = {"triple": slice(0, 96), "pair": slice(96, 144), "colour": slice(144, 152), "shape": slice(152, 158),
          "size": slice(158, 160), "count": slice(160, 163), "cell": slice(163, 172), "background": slice(172, 175)}
NUM_LABELS = 175  # scene attributes (multi-label)
OBJECT_HEADS = {"object_shape": (175, 175 + _S), "object_colour": (175 + _S, 175 + _S + _C),
                "object_size": (175 + _S + _C, 175 + _S + _C + _Z)}  # single objects (softmax each)
NUM_OUTPUTS = NUM_LABELS + _S + _C + _Z
PLACED = tuple[str, str, str, float, float]  # (shape, colour, size, x, y): an object and its centre in pixels


def attribute_labels(background: str, shapes: Sequence[Shape]) -> np.ndarray:
    """Multi-hot (175,) of a whole scene (cells = the objects' own grid cells); ``crop_labels`` for a crop."""
    return _labels(background, [(sh, co, sz, r * 3 + c) for sh, co, sz, r, c in shapes])


def _labels(background: str, parts: Sequence[tuple[str, str, str, int]]) -> np.ndarray:
    """[0, 96) triple (c * 6 + s) * 2 + z, [96, 144) pair c * 6 + s, [144, 152) colour, [152, 158) shape,
    [158, 160) size, [160, 163) count 1-3, [163, 172) cell row * 3 + col, [172, 175) background."""
    y = np.zeros(NUM_LABELS, np.float32)
    colours, kinds, sizes = list(COLOURS), list(SHAPES), list(SIZES)
    for sh, co, sz, cell in parts:
        c, s, z = colours.index(co), kinds.index(sh), sizes.index(sz)
        y[[(c * _S + s) * _Z + z, 96 + c * _S + s, 144 + c, 152 + s, 158 + z, 163 + cell]] = 1.0
    if parts:
        y[160 + min(len(parts), 3) - 1] = 1.0
    y[172 + list(BACKGROUNDS).index(background)] = 1.0
    return y


def excluded_identities(path: str | Path) -> set[tuple]:
    """Scene identities of a dataset written by prepare.synthetic (its scenes.json)."""
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
        return {scene_identity([(x["shape"], x["colour"], x["size"]) for x in r["shapes"]]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidValue(f"--exclude {path}: expected the scenes.json written by python -m prepare.synthetic "
                         f"(a list of {{'shapes': [{{'shape', 'colour', 'size', ...}}]}}): {e}") from e


def pool_scenes(n: int, rng: np.random.Generator, exclude: set[tuple] = frozenset()
                ) -> list[tuple[str, list[Shape]]]:
    """n unique scenes, none of whose identities is in ``exclude`` (the first n of make_scenes' stream that pass)."""
    return [s for s in make_scenes(n + len(exclude), rng) if scene_identity(s[1]) not in exclude][:n]


def make_pool(n: int, short_side: int, seed: int, exclude: set[tuple] = frozenset()
              ) -> list[tuple[np.ndarray, str, list[PLACED]]]:
    """n scenes rendered and resized to ``short_side`` as the preparer does: (H, W, 3) uint8, the background and
    each object with its centre in pixels (the grid cell's centre; the renderer's jitter is below a pixel here)."""
    rng = np.random.default_rng([seed, 65])  # independent of prepare.synthetic's default_rng(seed)
    pool = []
    for bg, parts in pool_scenes(n, rng, exclude):
        img = render(bg, parts, rng)
        w, h = target_size(img.width, img.height, short_side, "short_side")
        arr = np.asarray(img.resize((w, h), Image.Resampling.BICUBIC))
        pool.append((arr, bg, [(sh, co, sz, GRID[c] * w, GRID[r] * h) for sh, co, sz, r, c in parts]))
    return pool


def scene_crop(scene: tuple[np.ndarray, str, list[PLACED]], size: int, rng: np.random.Generator,
               box: tuple[float, float, float, float] | None = None, flip: bool | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """A (size, size, 3) crop of a pool scene (random unless ``box``/``flip`` are given) and its labels: the objects
    whose centre is inside, in the cells of the crop's own 3x3 grid (mirrored with the crop)."""
    arr, bg, objects = scene
    x0, y0, x1, y1 = box if box is not None else original_crop_box(arr.shape[1], arr.shape[0], rng)
    flip = bool(rng.random() < 0.5) if flip is None else flip
    out = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC, box=(x0, y0, x1, y1)))
    parts = []
    for sh, co, sz, x, y in objects:
        if x0 <= x < x1 and y0 <= y < y1:
            col, row = min(int(3 * (x - x0) / (x1 - x0)), 2), min(int(3 * (y - y0) / (y1 - y0)), 2)
            parts.append((sh, co, sz, row * 3 + (2 - col if flip else col)))
    return (out[:, ::-1] if flip else out), _labels(bg, parts)


def object_crop(scene: tuple[np.ndarray, str, list[PLACED]], size: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A (size, size, 3) window around one random object of the scene (at the scene's scale, up to size / 8 px off
    centre, flipped with p = 0.5) and its (shape, colour, size) indices."""
    arr, _, objects = scene
    sh, co, sz, x, y = objects[int(rng.integers(len(objects)))]
    j = size // 8
    left = int(np.clip(round(x - size / 2 + rng.integers(-j, j + 1)), 0, arr.shape[1] - size))
    top = int(np.clip(round(y - size / 2 + rng.integers(-j, j + 1)), 0, arr.shape[0] - size))
    out = arr[top:top + size, left:left + size]
    return (out[:, ::-1] if rng.random() < 0.5 else out), (SHAPES.index(sh), list(COLOURS).index(co),
                                                           list(SIZES).index(sz))


def _batch(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> float (N, 3, H, W) on ``device``, ImageNet mean/std (the pipeline's constants)."""
    import torch

    from models.image_cnn import IMAGENET_MEAN, IMAGENET_STD  # (models/ installs the torchvision guard first)
    x = torch.from_numpy(np.ascontiguousarray(np.stack(images))).to(device).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def heldout_accuracy(net: torch.nn.Module, pool: list, size: int, device: torch.device) -> dict[str, dict]:
    """Scene label groups on centre crops of held-out scenes: accuracy of (logit > 0) and the base rate (always the
    majority value); object heads on one object of each: accuracy and chance (the most frequent class)."""
    import torch

    rng = np.random.default_rng(0)
    crops, ys, objs, targets = [], [], [], []
    for scene in pool:
        h, w = scene[0].shape[:2]
        side = min(h, w)
        x, y = scene_crop(scene, size, rng, box=((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2),
                          flip=False)
        crops.append(x)
        ys.append(y)
        o, t = object_crop(scene, size // 2, rng)
        objs.append(o)
        targets.append(t)
    was_training = net.training
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(_batch(crops[i:i + 250], device)) for i in range(0, len(crops), 250)]).cpu()
        ologits = torch.cat([net(_batch(objs[i:i + 250], device)) for i in range(0, len(objs), 250)]).cpu()
    net.train(was_training)
    labels = torch.from_numpy(np.stack(ys))
    correct = ((logits[:, :NUM_LABELS] > 0) == labels.bool()).float().mean(0)
    base = torch.maximum(labels.mean(0), 1 - labels.mean(0))
    out = {g: {"accuracy": round(correct[s].mean().item(), 4), "base_rate": round(base[s].mean().item(), 4)}
           for g, s in GROUPS.items()}
    t = torch.tensor(targets)  # (n, 3)
    for k, (name, (lo, hi)) in enumerate(OBJECT_HEADS.items()):
        acc = (ologits[:, lo:hi].argmax(1) == t[:, k]).float().mean().item()
        out[name] = {"accuracy": round(acc, 4), "base_rate": round(t[:, k].bincount().max().item() / len(t), 4)}
    return out


def pretrain(out: str | Path, arch: str = "resnet18", size: int = 64, images: int = 3000, holdout: int = 500,
             steps: int = 600, batch: int = 32, lr: float = 2e-3, seed: int = 0, exclude: str | None = None,
             log_every: int = 100, device: str = "auto") -> dict[str, Any]:
    """Train and write ``out`` (state dict) and ``out.json`` (recipe + held-out accuracy); returns the JSON dict.
    Each step: ``batch`` scene crops (attributes) and 2 x ``batch`` object crops of half the side."""
    import torch
    import torch.nn.functional as F

    from models.image_cnn import ARCHS as IMAGE_ARCHS  # (models/ installs the torchvision guard first)

    if arch not in ARCHS:
        raise InvalidValue(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    if size < 32 or images < 1 or holdout < 1 or steps < 1 or batch < 1 or lr <= 0:
        raise InvalidValue(f"need size >= 32 and images, holdout, steps, batch, lr > 0 (got size={size}, "
                         f"images={images}, holdout={holdout}, steps={steps}, batch={batch}, lr={lr})")
    dev = resolve_device(device)
    t0 = time.time()
    excluded = excluded_identities(exclude) if exclude else set()
    short_side = size  # the demo prepares its images at the crop size (docs/demo.md: why)
    pool = make_pool(images + holdout, short_side, seed, excluded)
    train_pool, held_pool = pool[:images], pool[images:]
    torch.manual_seed(seed)
    net = IMAGE_ARCHS[arch][0](weights=None, num_classes=NUM_OUTPUTS).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    rng = np.random.default_rng([seed, 66])
    losses = []
    for step in range(steps):
        scenes = [scene_crop(train_pool[int(i)], size, rng) for i in rng.integers(images, size=batch)]
        objects = [object_crop(train_pool[int(i)], size // 2, rng) for i in rng.integers(images, size=2 * batch)]
        y = torch.from_numpy(np.stack([s[1] for s in scenes])).to(dev)  # (B, 175)
        t = torch.tensor([o[1] for o in objects], device=dev)  # (2B, 3)
        olog = net(_batch([o[0] for o in objects], dev))  # (2B, 191)
        loss = F.binary_cross_entropy_with_logits(net(_batch([s[0] for s in scenes], dev))[:, :NUM_LABELS], y)
        loss = loss + sum(F.cross_entropy(olog[:, lo:hi], t[:, k]) for k, (lo, hi) in
                          enumerate(OBJECT_HEADS.values())) / len(OBJECT_HEADS)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss.item()}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step}/{steps}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    recalibrate_bn(net, train_pool, size, batch, rng, dev)
    result = {"arch": arch, "size": size, "short_side": short_side, "images": images, "holdout": holdout,
              "steps": steps, "batch": batch, "lr": lr, "seed": seed, "exclude": str(exclude) if exclude else None,
              "excluded_scenes": len(excluded), "device": dev.type,
              "labels": "scene crops: 96 (colour, shape, size), 48 (colour, shape), 8 colours, 6 shapes, 2 sizes, "
                        "3 counts, 9 cells, 3 backgrounds (multi-label BCE); object crops: shape, colour, size "
                        "(softmax each)",
              "loss_first_last": [round(losses[0], 4), round(float(np.mean(losses[-10:])), 4)],
              "heldout": heldout_accuracy(net, held_pool, size, dev), "seconds": round(time.time() - t0, 1)}
    _write(net, result, Path(out))
    return result


def recalibrate_bn(net: torch.nn.Module, pool: list, size: int, batch: int, rng: np.random.Generator,
                   device: torch.device, batches: int = 16) -> None:
    """Re-estimate every BatchNorm's running mean and variance on scene crops only (the cumulative average over
    ``batches`` batches, weights untouched)."""
    import torch

    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for _ in range(batches):
            net(_batch([scene_crop(pool[int(i)], size, rng)[0] for i in rng.integers(len(pool), size=batch)],
                       device))
    for bn in bns:
        bn.momentum = 0.1


def _write(net: torch.nn.Module, result: dict, out: Path) -> None:
    """The state dict (on CPU) and its JSON sidecar, each written atomically; the .pth renamed last, so it exists
    only when complete."""
    import torch

    with atomic_write(out) as f:
        torch.save({k: v.cpu() for k, v in net.state_dict().items()}, f)
        write_json(result, out.with_name(out.name + ".json"))


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m prepare.synthetic_backbone", description=__doc__.split("\n\n")[0],
                       epilog="Load the result with --pretrained FILE.pth (scripts/demo.sh does).")
    p.add_argument("--out", required=True, help="state dict to write (FILE.pth; FILE.pth.json gets the recipe)")
    p.add_argument("--exclude", default=None, help="scenes.json of a prepare.synthetic dataset whose scenes the "
                   "pool must not contain (the demo passes its own)")
    p.add_argument("--arch", default="resnet18", choices=sorted(ARCHS), help="torchvision backbone (default: "
                   "resnet18)")
    p.add_argument("--size", type=int, default=64, help="scene crop side in pixels, the training crop of the "
                   "pipeline; object crops are half of it (default: 64)")
    p.add_argument("--images", type=int, default=3000, help="training scenes in the pool (default: 3000)")
    p.add_argument("--holdout", type=int, default=500, help="held-out scenes for the reported accuracy "
                   "(default: 500)")
    p.add_argument("--steps", type=int, default=600, help="optimiser steps (default: 600)")
    p.add_argument("--batch", type=int, default=32, help="scene crops per step, plus twice as many object crops "
                   "(default: 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (default: 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:N "
                   "(default: auto)")
    a = p.parse_args(argv)

    def body() -> None:
        r = pretrain(a.out, a.arch, a.size, a.images, a.holdout, a.steps, a.batch, a.lr, a.seed, a.exclude,
                     device=a.device)
        held = ", ".join(f"{g} {v['accuracy']:.3f} (base {v['base_rate']:.3f})" for g, v in r["heldout"].items()
                         if g in ("colour", "shape", "size", "background", "object_shape"))
        print(f"wrote {a.out} ({r['seconds']:.0f} s); held-out accuracy: {held}")

    return run_guarded(body, errors=(InvalidValue, OSError, FloatingPointError),
                       interrupted=f"interrupted: {a.out} was not written")


if __name__ == "__main__":
    sys.exit(main())
