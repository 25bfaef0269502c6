"""The original networks as lists of ``Entry`` and ``Node`` (reference matconvnet_models.md sections 3, 4 and 6):
every parameter of the Caffe ResNet backbone, the authors' image head, text CNN and shared classifier, with the
layer that owns it, the shape it must have (from widths inferred from the file), the geometry (stride, pad) and the
state-dict key of its PyTorch module; and every layer's wiring from the inputs to the features and the classifier.
Block counts, widths, the key names and the new BNs' epsilon are ``models/spec.py``'s; the MatConvNet names (Caffe's
``res{S}{b}_branch2a``, the authors' ``fc2_1``, ``fc3_5a_2``, ...) are this module's.
"""
from __future__ import annotations

import string
from typing import Any

from dataclasses import replace

from matconvnet.dagnn import DagNN, Entry, Node, check_conv_block
from models import spec
from prepare.matfile import describe

ARCH_BLOCKS = {blocks: arch for arch, blocks in spec.RESNET_BLOCKS.items()}
TEXT_DEPTH = "res50"  # the authors' text CNN (the only one in their files)


def _block_ids(n: int, numbered: bool) -> list[str]:
    return ["a"] + [f"b{i}" for i in range(1, n)] if numbered else list(string.ascii_lowercase[:n])


def resnet_arch(dag: DagNN) -> tuple[str, tuple[tuple[str, ...], ...]]:
    """The ResNet variant from the block names present (res{S}a.., or res{S}a, res{S}b1.. of ResNet-101/152)."""
    counts, ids = [], []
    for stage in (2, 3, 4, 5):
        numbered = f"res{stage}b1_branch2a_filter" in dag.params
        n = 0
        while f"res{stage}{_block_ids(n + 1, numbered)[-1]}_branch2a_filter" in dag.params:
            n += 1
        counts.append(n)
        ids.append(tuple(_block_ids(n, numbered)))
    arch = ARCH_BLOCKS.get(tuple(counts))
    if arch is None:
        raise dag.fail(f"ResNet blocks per stage {tuple(counts)} (from the res{{S}}{{b}}_branch2a_filter names) "
                       f"match no supported image CNN; expected {dict((v, k) for k, v in ARCH_BLOCKS.items())}")
    return arch, tuple(ids)


def _bn(layer: str, names: tuple[str, str, str], key: str, channels: int, group: str = "new") -> Entry:
    return Entry("bn", layer, names, key, (channels,), group=group)


def resnet_spec(dag: DagNN) -> tuple[list[Entry], list[Node], dict[str, Any]]:
    """The Caffe ResNet backbone (torchvision key names) with widths inferred from conv1, and its wiring from
    ``data`` to ``pool5`` (reference section 3: Caffe layer names; a block's sum ``res{S}{b}`` and ReLU)."""
    arch, ids = resnet_arch(dag)
    conv1 = dag.params.get("conv1_filter")
    if conv1 is None or conv1.ndim != 4 or conv1.shape[:3] != (7, 7, 3):
        raise dag.fail(f"param 'conv1_filter' must be 7x7x3xC (the Caffe ResNet conv1), got "
                       f"{describe(conv1) if conv1 is not None else 'nothing'}")
    base = int(conv1.shape[3])  # RESNET_STEM x backbone_width
    width = base / spec.RESNET_STEM
    stem_conv, stem_bn = spec.BACKBONE_SEQUENCE[:2]
    entries = [Entry("conv2d", "conv1", ("conv1_filter", "conv1_bias"), stem_conv, (7, 7, 3, base), 2, (3, 3, 3, 3),
                     "backbone"),
               _bn("bn_conv1", ("bn_conv1_mult", "bn_conv1_bias", "bn_conv1_moments"), stem_bn, base, "backbone")]
    nodes = [Node("conv1", "dagnn.Conv", ("data",)), Node("bn_conv1", "dagnn.BatchNorm", ("conv1",)),
             Node("conv1_relu", "dagnn.ReLU", ("bn_conv1",)), Node("pool1", "dagnn.Pooling", ("conv1_relu",))]
    x = "pool1"
    blocks = spec.resnet_blocks(arch, width)
    for blk in blocks:
        stage, b = blk.stage + 2, ids[blk.stage][blk.index]  # Caffe's res2a .. res5c (res3b1 .. of ResNet-152)
        y = x
        for (branch, size, stride, pad), (conv, norm) in zip(
                (("2a", (1, 1, blk.cin, blk.mid), blk.stride, 0), ("2b", (3, 3, blk.mid, blk.mid), 1, 1),
                 ("2c", (1, 1, blk.mid, blk.cout), 1, 0)), spec.CAFFE_BOTTLENECK):
            name, bn = f"res{stage}{b}_branch{branch}", f"bn{stage}{b}_branch{branch}"
            entries += [Entry("conv2d", name, (f"{name}_filter",), f"{blk.key}.{conv}", size, stride, (pad,) * 4,
                              "backbone"),
                        _bn(bn, (f"{bn}_mult", f"{bn}_bias", f"{bn}_moments"), f"{blk.key}.{norm}", size[3],
                            "backbone")]
            nodes += [Node(name, "dagnn.Conv", (y,)), Node(bn, "dagnn.BatchNorm", (name,))]
            y = bn
            if branch != "2c":
                nodes.append(Node(f"{name}_relu", "dagnn.ReLU", (bn,)))
                y = f"{name}_relu"
        shortcut = x
        if blk.projection:
            name, bn = f"res{stage}{b}_branch1", f"bn{stage}{b}_branch1"
            conv, norm = spec.CAFFE_PROJECTION
            entries += [Entry("conv2d", name, (f"{name}_filter",), f"{blk.key}.{conv}", (1, 1, blk.cin, blk.cout),
                              blk.stride, group="backbone"),
                        _bn(bn, (f"{bn}_mult", f"{bn}_bias", f"{bn}_moments"), f"{blk.key}.{norm}", blk.cout,
                            "backbone")]
            nodes += [Node(name, "dagnn.Conv", (x,)), Node(bn, "dagnn.BatchNorm", (name,))]
            shortcut = bn
        nodes += [Node(f"res{stage}{b}", "dagnn.Sum", (shortcut, y)),
                  Node(f"res{stage}{b}_relu", "dagnn.ReLU", (f"res{stage}{b}",))]
        x = f"res{stage}{b}_relu"
    nodes.append(Node("pool5", "dagnn.Pooling", (x,), var="pool5"))  # fc1 (and fc1000) read it by name
    return entries, nodes, {"arch": arch, "backbone_width": width, "backbone_channels": blocks[-1].cout}


def head_spec(dag: DagNN, channels: int) -> tuple[list[Entry], list[Node], dict[str, Any]]:
    """The image head fc1 / fc1_1 (ResNet) on the backbone's ``channels``; feature size from fc1_1f. Wiring
    (reference 4.1): pool5 -> fc1 -> fc1bn -> ReLU -> fc1_1 -> fc1_1bn (the test feature) -> ReLU -> dropout."""
    f = dag.params.get("fc1_1f")
    if f is None or f.ndim < 4:
        raise dag.fail(f"param 'fc1_1f' must be a [1 1 D D] filter, got {describe(f) if f is not None else 'nothing'}")
    dim = int(f.shape[3])
    (fc1, fc1_bn), (fc1_1, fc1_1_bn) = spec.IMAGE_HEAD
    entries = [Entry("conv2d", "fc1", ("fc1f",), fc1, (1, 1, channels, dim)),
               _bn("fc1bn", ("fc1bn_w", "fc1bn_b", "fc1bn_m"), fc1_bn, dim),
               Entry("conv2d", "fc1_1", ("fc1_1f",), fc1_1, (1, 1, dim, dim)),
               _bn("fc1_1bn", ("fc1_1bn_w", "fc1_1bn_b", "fc1_1bn_m"), fc1_1_bn, dim)]
    nodes = [Node("fc1", "dagnn.Conv", ("pool5",)), Node("fc1bn", "dagnn.BatchNorm", ("fc1",)),
             Node("fc1x", "dagnn.ReLU", ("fc1bn",)), Node("fc1_1", "dagnn.Conv", ("fc1x",)),
             Node("fc1_1bn", "dagnn.BatchNorm", ("fc1_1",), var="fc1_1bn"), Node("fc1_1x", "dagnn.ReLU", ("fc1_1bn",)),
             Node("dropout", "dagnn.DropOut", ("fc1_1x",))]
    return entries, nodes, {"feature_dim": dim}


def _text_names(blocks: list[spec.Block]) -> list[tuple[str, str]]:
    """(prefix, kind) of each text block as the authors named it: fc2_1 (the first projection), fc2_2, fc2_3 (identity),
    fc2_4 (a projection, its main path fc2_4a_k), fc3_2 .. fc3_4, fc3_5, fc4_2 .. fc4_6, fc4_7 (reference 4.2)."""
    counts = [sum(b.stage == i for b in blocks) for i in range(blocks[-1].stage + 1)]
    return [("fc2_1", "first") if (b.stage, b.index) == (0, 0)
            else (f"fc{b.stage + 1}_{counts[b.stage - 1] + 1}", "proj") if b.index == 0
            else (f"fc{b.stage + 2}_{b.index + 1}", "id") for b in blocks]


def text_spec(dag: DagNN, dim: int) -> tuple[list[Entry], list[Node], dict[str, Any]]:
    """The text CNN (reference 4.2): embedding, 14 bottleneck blocks of 1x2 convs, fc5_1 max pool, fc5_2; wired
    from ``data2`` to ``fc5_2bn`` (the test feature) and dropout2."""
    f = dag.params.get("fc2f")
    if f is None or f.ndim != 4 or f.shape[:2] != (1, 1):
        raise dag.fail(f"param 'fc2f' must be the [1 1 V {spec.EMBED_DIM}] word2vec layer, got "
                       f"{describe(f) if f is not None else 'nothing'}")
    vocab = int(f.shape[2])
    out0 = dag.params.get("fc2_1_3f")
    if out0 is None or out0.ndim != 4:
        raise dag.fail("param 'fc2_1_3f' (the first text block's output conv) is missing or not a 4-D filter")
    width = int(out0.shape[3]) / spec.TEXT_STAGES[TEXT_DEPTH][0][2]
    entries = [Entry("embed", "fc2", ("fc2f", "fc2b"), spec.TEXT_EMBED, (1, 1, vocab, spec.EMBED_DIM)),
               _bn("fc2bn", ("fc2bn_w", "fc2bn_b", "fc2bn_m"), spec.TEXT_EMBED_BN, spec.EMBED_DIM)]
    nodes = [Node("fc2", "dagnn.Conv", ("data2",)), Node("fc2bn", "dagnn.BatchNorm", ("fc2",))]
    x = "fc2bn"  # no ReLU after it
    blocks = spec.text_blocks(TEXT_DEPTH, width)
    for blk, (prefix, kind) in zip(blocks, _text_names(blocks)):
        main = f"{prefix}a" if kind == "proj" else prefix
        y = x
        for j, ((name, size, stride), (conv, norm)) in enumerate(zip(
                ((f"{main}_1", (1, 1, blk.cin, blk.mid), 1), (f"{main}_2", (1, 2, blk.mid, blk.mid), blk.stride),
                 (f"{main}_3", (1, 1, blk.mid, blk.cout), 1)), spec.TEXT_BRANCH)):
            bn_layer = f"{name}bn_1" if (kind == "id" and j == 0) else f"{name}bn"
            entries += [Entry("conv1d", name, (f"{name}f",), f"{blk.key}.{conv}", size, stride,
                              (0, 0, 1, 0) if size[1] == 2 else (0, 0, 0, 0)),
                        _bn(bn_layer, (f"{name}bn_w", f"{name}bn_b", f"{name}bn_m"), f"{blk.key}.{norm}", size[3])]
            nodes += [Node(name, "dagnn.Conv", (y,)), Node(bn_layer, "dagnn.BatchNorm", (name,))]
            y = bn_layer
            if j < 2:
                nodes.append(Node(f"{name}x", "dagnn.ReLU", (bn_layer,)))
                y = f"{name}x"
        shortcut = x
        if blk.projection:
            short = f"{prefix}b"
            conv, norm = spec.TEXT_SHORTCUT
            entries += [Entry("conv1d", short, (f"{short}f",), f"{blk.key}.{conv}", (1, 1, blk.cin, blk.cout),
                              blk.stride),
                        _bn(f"{short}bn", (f"{short}bn_w", f"{short}bn_b", f"{short}bn_m"), f"{blk.key}.{norm}",
                            blk.cout)]
            nodes += [Node(short, "dagnn.Conv", (x,)), Node(f"{short}bn", "dagnn.BatchNorm", (short,))]
            shortcut = f"{short}bn"
        nodes += [Node(f"{prefix}sum", "dagnn.Sum", (shortcut, y)), Node(f"{prefix}x", "dagnn.ReLU", (f"{prefix}sum",))]
        x = f"{prefix}x"
    fc, fc_bn = spec.TEXT_FC
    entries += [Entry("linear", "fc5_2", ("fc5_2f",), fc, (1, 1, blocks[-1].cout, dim)),
                _bn("fc5_2bn", ("fc5_2bn_w", "fc5_2bn_b", "fc5_2bn_m"), fc_bn, dim)]
    nodes += [Node("fc5_1", "dagnn.Pooling", (x,)), Node("fc5_2", "dagnn.Conv", ("fc5_1",)),
              Node("fc5_2bn", "dagnn.BatchNorm", ("fc5_2",), var="fc5_2bn"), Node("fc5_2x", "dagnn.ReLU", ("fc5_2bn",)),
              Node("dropout2", "dagnn.DropOut", ("fc5_2x",))]
    pool = dag.layer("fc5_1", "dagnn.Pooling")
    size = dag.number(pool, "poolSize", 2)
    method = str(pool.block.get("method", "max")) or "max"
    if size[0] != 1 or method not in ("max", "avg") or dag.number(pool, "stride", 2) != [1, 1] \
            or dag.number(pool, "pad", 4) != [0, 0, 0, 0]:
        raise dag.fail(f"layer 'fc5_1': expected a max (or avg) pooling [1 L/4] over the whole sentence, stride 1, "
                       f"pad 0; got method {method!r}, poolSize {size}, stride {dag.number(pool, 'stride', 2)}, "
                       f"pad {dag.number(pool, 'pad', 4)}")
    return entries, nodes, {"vocab_size": vocab, "text_width": width,
                            "max_len": int(size[1]) * spec.text_downsample(TEXT_DEPTH), "text_pool": method}


def classifier_spec(dag: DagNN, dim: int) -> tuple[list[Entry], list[Node], dict[str, Any]]:
    """The ONE shared W: fc_img and fc_txt must both name fcsharef (and fcshareb, when the file has it); fc_img reads
    the image path's dropout, fc_txt the text path's."""
    w = dag.params.get("fcsharef")
    if w is None or w.ndim != 4:
        raise dag.fail("param 'fcsharef' (the shared classifier W, [1 1 D N]) is missing or not 4-D")
    bias = "fcshareb" in dag.params
    names = ("fcsharef", "fcshareb") if bias else ("fcsharef",)
    for layer in ("fc_img", "fc_txt"):
        got = tuple(dag.layer(layer, "dagnn.Conv").params)
        if got != names:
            raise dag.fail(f"layer {layer!r} has params {list(got)}, expected {list(names)}: both paths must share "
                           f"one classifier W")
    nodes = [Node("fc_img", "dagnn.Conv", ("dropout",)), Node("fc_txt", "dagnn.Conv", ("dropout2",))]
    entry = Entry("linear", "fc_img", names, spec.CLASSIFIER, (1, 1, dim, int(w.shape[3])))
    check_conv_block(dag, replace(entry, layer="fc_txt"))  # fc_img's block is checked where W is read
    return [entry], nodes, {"num_classes": int(w.shape[3]), "classifier_bias": bias}
