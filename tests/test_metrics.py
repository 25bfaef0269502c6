"""engine.metrics against a plain brute-force reference (full sort per query, correct items first among ties)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.chance import chance_level
from engine.metrics import (_GreaterCounter, evaluate_folds, evaluate_retrieval, rank_of_first_match,
                            recall_metrics, retrieval_ranks)


# ----------------------------------------------------------------------------------------------- brute force
def brute_ranks(scores: np.ndarray, query_labels, gallery_labels) -> np.ndarray:
    """For every query: sort ALL gallery items by score, descending, correct items first among equal scores
    (then by index), and return the 1-based position of the first correct item."""
    ranks = []
    for q in range(scores.shape[0]):
        correct = np.array([g == query_labels[q] for g in gallery_labels])
        order = sorted(range(scores.shape[1]), key=lambda j: (-scores[q, j], not correct[j], j))
        ranks.append(next(pos for pos, j in enumerate(order) if correct[j]) + 1)
    return np.array(ranks)


def brute_metrics(ranks: np.ndarray) -> dict[str, float]:
    """R@K, medr by its literal definition (smallest K with hit rate > 0.5), meanr."""
    out = {f"R@{k}": 100.0 * float(np.mean(ranks <= k)) for k in (1, 5, 10)}
    out["medr"] = float(next(k for k in range(1, int(ranks.max()) + 1) if np.mean(ranks <= k) > 0.5))
    out["meanr"] = float(np.mean(ranks))
    return out


def brute_evaluate(images, texts, image_labels, text_labels, normalize=True, directions=("i2t", "t2i")):
    im, tx = images.double(), texts.double()
    if normalize:
        im, tx = F.normalize(im, dim=1), F.normalize(tx, dim=1)
    s = (im @ tx.T).numpy()  # (N, M)
    il, tl = list(np.asarray(image_labels)), list(np.asarray(text_labels))
    out = {}
    if "i2t" in directions:
        out["i2t"] = brute_metrics(brute_ranks(s, il, tl))
    if "t2i" in directions:
        out["t2i"] = brute_metrics(brute_ranks(s.T, tl, il))
    out["rsum"] = sum(v for d in ("i2t", "t2i") if d in out for k, v in out[d].items() if k.startswith("R@"))
    return out


def assert_same(ours: dict, ref: dict) -> None:
    for d in ("i2t", "t2i"):
        assert (d in ours) == (d in ref)
        if d in ref:
            assert set(ours[d]) == set(ref[d])
            for k in ref[d]:
                assert ours[d][k] == pytest.approx(ref[d][k], abs=1e-9), (d, k)
    assert ours["rsum"] == pytest.approx(ref["rsum"], abs=1e-9)


def planted(n_images: int, counts, dim: int, noise: float, seed: int, dtype=torch.float64):
    """Random images; each caption = its image + noise. counts: captions per image (int or list)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.as_tensor(counts).expand(n_images) if isinstance(counts, int) else torch.as_tensor(counts)
    text_labels = torch.repeat_interleave(torch.arange(n_images), counts)
    images = torch.randn(n_images, dim, generator=g, dtype=dtype)
    texts = images[text_labels] + noise * torch.randn(len(text_labels), dim, generator=g, dtype=dtype)
    return images, texts, torch.arange(n_images), text_labels


# ------------------------------------------------------------------------------------------ hand examples
def hand_example():
    """3 images (one-hot), 6 texts; score(text, image k) = text[k]. Texts 0,1 -> image 0; 2,3 -> 1; 4,5 -> 2."""
    images = torch.eye(3)
    texts = torch.tensor([[9, 1, 0], [2, 8, 0], [5, 5, 1], [0, 3, 4], [6, 0, 4], [3, 3, 2]], dtype=torch.float32)
    return images, texts, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 2])


def test_hand_example_written_out():
    images, texts, il, tl = hand_example()
    ranks = retrieval_ranks(images, texts, il, tl, normalize=False)
    # image 0: captions score 9, 2 -> best 9, nothing above -> 1.
    # image 1: captions 5, 3; text 1 scores 8 > 5 -> 2.    image 2: captions 4, 2; text 3 TIES at 4 -> 1.
    assert ranks["i2t"].tolist() == [1, 2, 1]
    # t0: 9 vs 1, 0 -> 1;  t1: 2 vs 8 -> 2;  t2: 5 TIES 5 -> 1;  t3: 3 vs 4 -> 2;  t4: 4 vs 6 -> 2;  t5: 2 vs 3, 3 -> 3
    assert ranks["t2i"].tolist() == [1, 2, 1, 2, 2, 3]
    res = evaluate_retrieval(images, texts, il, tl, normalize=False)
    assert res["i2t"] == pytest.approx({"R@1": 200 / 3, "R@5": 100.0, "R@10": 100.0, "medr": 1.0, "meanr": 4 / 3})
    assert res["t2i"] == pytest.approx({"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0, "medr": 2.0, "meanr": 11 / 6})
    assert res["rsum"] == pytest.approx(500.0)
    assert set(res) == {"i2t", "t2i", "rsum"}
    assert_same(res, brute_evaluate(images, texts, il, tl, normalize=False))


@pytest.mark.parametrize("ranks,medr", [([1, 2, 3], 2), ([1, 1, 3, 3], 3), ([2, 2, 9, 9], 9), ([1, 1, 1, 5], 1),
                                        ([4], 4), ([1, 7], 7), ([3, 1, 2, 5, 4], 3)])
def test_medr_hand_examples(ranks, medr):
    """medr = smallest K with hit rate(K) > 0.5 = the upper middle rank for even n (vsepp's floor(median)
    convention gives 2 for [1, 1, 3, 3] and 5 for [2, 2, 9, 9])."""
    assert recall_metrics(torch.tensor(ranks))["medr"] == medr
    assert brute_metrics(np.array(ranks))["medr"] == medr
    assert recall_metrics(torch.tensor(ranks))["meanr"] == pytest.approx(np.mean(ranks))


def test_medr_equals_definition_random():
    g = torch.Generator().manual_seed(3)
    for n in range(1, 40):
        r = torch.randint(1, 12, (n,), generator=g)
        assert recall_metrics(r)["medr"] == brute_metrics(r.numpy())["medr"]


# ----------------------------------------------------------------------------------- brute-force comparisons
def test_exact_ties_integer_embeddings_and_duplicates():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(-2, 3, (30, 6), generator=g).float()
    images[10:15] = images[:5]  # duplicated images: exact ties between a correct and a wrong image
    il = torch.arange(30)
    tl = torch.arange(30).repeat_interleave(5)
    texts = images[tl] + torch.randint(-2, 3, (150, 6), generator=g).float()
    texts[::7] = texts[1::7][: len(texts[::7])]  # duplicated captions
    assert_same(evaluate_retrieval(images, texts, il, tl, normalize=False),
                brute_evaluate(images, texts, il, tl, normalize=False))


def test_exact_ties_with_normalisation():
    """Vectors with four entries of +-1 have norm 2: normalised scores are exact multiples of 1/4 (many ties)."""
    g = torch.Generator().manual_seed(1)
    feats = torch.zeros(160, 8)
    for i in range(160):
        idx = torch.randperm(8, generator=g)[:4]
        feats[i, idx] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    images, texts = feats[:40] * 3, feats[40:]  # scaling does not matter after normalisation
    il, tl = torch.arange(40), torch.arange(40).repeat(3)
    assert_same(evaluate_retrieval(images, texts, il, tl), brute_evaluate(images, texts, il, tl))


def test_five_captions_per_image():
    images, texts, il, tl = planted(40, 5, 16, 1.5, seed=2)
    ours, ref = evaluate_retrieval(images, texts, il, tl), brute_evaluate(images, texts, il, tl)
    assert_same(ours, ref)
    assert 0 < ours["i2t"]["R@1"] < 100 and 0 < ours["t2i"]["R@1"] < 100  # non-trivial


def test_unequal_caption_counts_shuffled_order_and_odd_labels():
    counts = torch.randint(5, 8, (35,), generator=torch.Generator().manual_seed(4))
    images, texts, _, tl = planted(35, counts, 12, 1.5, seed=5)
    il = torch.randperm(1000, generator=torch.Generator().manual_seed(6))[:35] * 7 + 100000  # cocoid-like ids
    tl = il[tl]
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(7))  # captions not grouped
    texts, tl = texts[perm], tl[perm]
    assert_same(evaluate_retrieval(images, texts, il, tl), brute_evaluate(images, texts, il, tl))
    # string labels work too
    il_s, tl_s = [f"img{int(x)}" for x in il], [f"img{int(x)}" for x in tl]
    assert_same(evaluate_retrieval(images, texts, il_s, tl_s), brute_evaluate(images, texts, il, tl))


def test_identity_labels_several_correct_images():
    """CUHK-PEDES style: label = person id; several images and several captions per id."""
    g = torch.Generator().manual_seed(8)
    ids = torch.randn(15, 10, generator=g, dtype=torch.float64)
    il = torch.randint(0, 15, (45,), generator=g)
    il[:15] = torch.arange(15)  # every id has an image
    tl = torch.randint(0, 15, (70,), generator=g)
    images = ids[il] + 0.8 * torch.randn(45, 10, generator=g, dtype=torch.float64)
    texts = ids[tl] + 0.8 * torch.randn(70, 10, generator=g, dtype=torch.float64)
    t2i = evaluate_retrieval(images, texts, il, tl, directions=("t2i",))
    ref = brute_evaluate(images, texts, il, tl, directions=("t2i",))
    assert_same(t2i, ref)
    assert t2i["rsum_directions"] == ["t2i"] and set(t2i) == {"t2i", "rsum", "rsum_directions"}
    assert t2i["rsum"] == pytest.approx(sum(t2i["t2i"][k] for k in ("R@1", "R@5", "R@10")))
    tl_all = torch.cat([tl, torch.arange(15)])  # both directions need a caption for every id
    texts_all = torch.cat([texts, ids + 0.8 * torch.randn(15, 10, generator=g, dtype=torch.float64)])
    assert_same(evaluate_retrieval(images, texts_all, il, tl_all), brute_evaluate(images, texts_all, il, tl_all))


def test_folds_vs_brute_force():
    counts = torch.randint(5, 8, (50,), generator=torch.Generator().manual_seed(9))
    images, texts, il, tl = planted(50, counts, 12, 1.2, seed=10)
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(11))
    texts, tl = texts[perm], tl[perm]
    res = evaluate_folds(images, texts, il, tl, folds=5)
    folds = []
    for f in range(5):
        keep = (tl >= 10 * f) & (tl < 10 * (f + 1))
        folds.append(brute_evaluate(images[10 * f: 10 * (f + 1)], texts[keep], il[10 * f: 10 * (f + 1)], tl[keep]))
    mean = {d: {k: float(np.mean([r[d][k] for r in folds])) for k in folds[0][d]} for d in ("i2t", "t2i")}
    mean["rsum"] = float(np.mean([r["rsum"] for r in folds]))
    assert_same(res, mean)
    for ours, ref in zip(res["folds"], folds):
        assert_same(ours, ref)
    assert len(res["folds"]) == 5
    # not the whole-set evaluation (first-fold-only or 5K would differ)
    assert res["i2t"]["R@1"] != evaluate_retrieval(images, texts, il, tl)["i2t"]["R@1"]
    with pytest.raises(ValueError, match="equal folds"):
        evaluate_folds(images[:49], texts, il[:49], tl, folds=5)
    # one direction (CUHK-PEDES): the t2i fold means alone, rsum over its three recalls
    t2i = evaluate_folds(images, texts, il, tl, folds=5, directions=("t2i",))
    assert "i2t" not in t2i and t2i["rsum_directions"] == ["t2i"]
    assert t2i["t2i"] == pytest.approx(mean["t2i"])
    assert t2i["rsum"] == pytest.approx(sum(mean["t2i"][k] for k in ("R@1", "R@5", "R@10")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunk_sizes_give_identical_ranks(dtype):
    counts = torch.randint(1, 4, (60,), generator=torch.Generator().manual_seed(12))
    images, texts, il, tl = planted(60, counts, 8, 2.0, seed=13, dtype=dtype)
    il = il // 2  # two images per label: label groups bigger than chunk_size=1
    tl = tl // 2
    ref = retrieval_ranks(images, texts, il, tl, chunk_size=10**6)
    for cs in (1, 7, 64):
        got = retrieval_ranks(images, texts, il, tl, chunk_size=cs)
        assert torch.equal(got["i2t"], ref["i2t"]) and torch.equal(got["t2i"], ref["t2i"])
        got = retrieval_ranks(images, texts, il, tl, chunk_size=cs, directions=("t2i",))
        assert torch.equal(got["t2i"], ref["t2i"])
    got = retrieval_ranks(images, texts, il, tl, max_chunk_bytes=1)  # one row per chunk
    assert torch.equal(got["i2t"], ref["i2t"]) and torch.equal(got["t2i"], ref["t2i"])


def test_rank_of_first_match_sim_and_feature_paths_agree():
    images, texts, il, tl = planted(25, 3, 8, 1.0, seed=14)
    sim = images @ texts.T  # (N, M)
    ref_i2t = brute_ranks(sim.numpy(), il.tolist(), tl.tolist())
    for cs in (None, 1, 4):
        assert rank_of_first_match(sim, il, tl, chunk_size=cs).tolist() == ref_i2t.tolist()
        assert rank_of_first_match(None, il, tl, queries=images, gallery=texts, chunk_size=cs).tolist() == \
            ref_i2t.tolist()
        assert rank_of_first_match(sim.T, tl, il, chunk_size=cs).tolist() == \
            brute_ranks(sim.T.numpy(), tl.tolist(), il.tolist()).tolist()
    with pytest.raises(ValueError, match="either sim"):
        rank_of_first_match(sim, il, tl, queries=images, gallery=texts)
    with pytest.raises(ValueError, match="either sim"):
        rank_of_first_match(None, il, tl, queries=images)


def test_queries_without_match_raise():
    images, texts, il, tl = planted(6, 2, 4, 1.0, seed=15)
    with pytest.raises(ValueError, match="no correct item"):
        evaluate_retrieval(images, texts[:-2], il, tl[:-2])  # the last image has no caption left
    evaluate_retrieval(images, texts[:-2], il, tl[:-2], directions=("t2i",))  # fine as a t2i distractor
    with pytest.raises(ValueError, match="no correct item"):
        rank_of_first_match(images @ texts.T, il + 100, tl)
    with pytest.raises(ValueError, match="subset"):
        evaluate_retrieval(images, texts, il, tl, directions=("i2i",))


def test_greater_counter_lanes_do_not_overflow():
    """SWAR counting: all-true comparisons fill every byte lane to its maximum (600 rows > 255, 2100 columns)."""
    g = torch.Generator().manual_seed(16)
    s = torch.randn(600, 2100, generator=g)
    counter = _GreaterCounter(600, 2100, s.device)
    for thr_r, thr_c in [(torch.full((600,), -math.inf), torch.full((2100,), -math.inf)),
                         (torch.randn(600, generator=g), torch.randn(2100, generator=g))]:
        assert torch.equal(counter.per_row(s, thr_r).long(), (s > thr_r[:, None]).sum(1))
        assert torch.equal(counter.per_col(s, thr_c).long(), (s > thr_c[None, :]).sum(0))
        assert torch.equal(counter.per_row(s[:7], thr_r[:7]).long(), (s[:7] > thr_r[:7, None]).sum(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    images, texts, il, tl = planted(300, 5, 64, 3.0, seed=17, dtype=torch.float32)
    cpu = retrieval_ranks(images.double(), texts.double(), il, tl)
    gpu = retrieval_ranks(images.double().cuda(), texts.double().cuda(), il.cuda(), tl.cuda(), chunk_size=100)
    assert torch.equal(gpu["i2t"].cpu(), cpu["i2t"]) and torch.equal(gpu["t2i"].cpu(), cpu["t2i"])
    assert evaluate_retrieval(images.cuda(), texts.cuda(), il.cuda(), tl.cuda())["rsum"] > 0


def test_single_direction_i2t_and_non_contiguous_features():
    images, texts, il, tl = planted(20, 5, 6, 1.0, seed=18)
    texts_t = texts.T.contiguous().T  # same values, column-major storage
    assert not texts_t.is_contiguous()
    res = evaluate_retrieval(images, texts_t, il, tl, normalize=False, directions=("i2t",))
    assert set(res) == {"i2t", "rsum", "rsum_directions"} and res["rsum_directions"] == ["i2t"]
    assert_same(res, brute_evaluate(images, texts, il, tl, normalize=False, directions=("i2t",)))


@pytest.mark.parametrize("n, c", [(3, 2), (4, 1), (2, 3)])
def test_chance_level_equals_every_random_ranking(n, c):
    """chance_level against brute force: every ordering of the gallery, ranked by rank_of_first_match (the
    evaluator's own rank), gives the exact expected R@K and the rank distribution whose half-way point is medr."""
    import itertools
    ks = (1, 2, 5)
    got = chance_level(n, c, ks)
    m = n * c
    text_labels = torch.arange(n).repeat_interleave(c)  # (M,)
    for d, gallery_labels, query_label, size in (("i2t", text_labels, 0, m), ("t2i", torch.arange(n), 0, n)):
        ranks = []
        for perm in itertools.permutations(range(size)):
            sim = torch.tensor(perm, dtype=torch.float32)[None]  # (1, G): one query, every order equally likely
            ranks.append(int(rank_of_first_match(sim, [query_label], gallery_labels)[0]))
        ranks = np.array(ranks)
        for k in ks:
            assert got[d][f"R@{k}"] == pytest.approx(100.0 * np.mean(ranks <= k), abs=1e-9), (d, k)
        assert got[d]["medr"] == min(r for r in range(1, size + 1) if np.mean(ranks <= r) > 0.5), d
    assert got["rsum"] == pytest.approx(sum(got[d][f"R@{k}"] for d in ("i2t", "t2i") for k in ks))


def test_chance_level_of_the_demo_split_and_random_features():
    """50 images x 5 captions: t2i R@K = K/50, Med r 26; i2t R@1 2, R@10 18.6 (not 20), Med r 33; and random
    features score near it."""
    ch = chance_level(50, 5)
    assert [ch["t2i"][k] for k in ("R@1", "R@5", "R@10", "medr")] == pytest.approx([2, 10, 20, 26])
    assert ch["i2t"]["R@1"] == pytest.approx(2.0) and ch["i2t"]["R@10"] == pytest.approx(18.60, abs=0.01)
    assert ch["i2t"]["medr"] == 33 and ch["rsum"] == pytest.approx(62.28, abs=0.01)
    g = torch.Generator().manual_seed(0)
    runs = [evaluate_retrieval(torch.randn(50, 16, generator=g), torch.randn(250, 16, generator=g),
                               torch.arange(50), torch.arange(50).repeat_interleave(5))["rsum"] for _ in range(200)]
    assert np.mean(runs) == pytest.approx(ch["rsum"], abs=2.0)  # 200 runs: standard error ~0.8
