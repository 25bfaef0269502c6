"""Tests for models.text_cnn: the deep text CNN (spec 3, 5, 10.1/10.11/10.12) and the position shift (spec 2.1)."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models import TextCNN, all_shifts, shift_tokens

BENCH = str(Path(__file__).resolve().parents[1] / "bench")
if BENCH not in sys.path:
    sys.path.append(BENCH)  # bench/ scripts import their neighbours by name
import text_layout  # noqa: E402  (bench/text_layout.py: a candidate (N, L, C) layout of the same network)

V = 40  # a tiny vocabulary; word indices 1..V, 0 = padding


def randomize_bn_(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode BN is not (almost) the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))


@pytest.fixture(scope="module")
def text32() -> TextCNN:
    torch.manual_seed(0)
    model = TextCNN(V, max_len=32, dropout=0.75)
    with torch.no_grad():
        model.embed_bias.copy_(0.1 * torch.randn(300))
    randomize_bn_(model)
    return model.eval()


@pytest.fixture(scope="module")
def text8() -> TextCNN:
    torch.manual_seed(1)
    model = TextCNN(V, max_len=8)
    randomize_bn_(model, seed=1)
    return model.eval()


def words(n: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V + 1, (n, length), generator=g)


# ----------------------------------------------------------------------------------------------- shapes, spec 5

@pytest.mark.parametrize("max_len", [32, 56])
def test_shapes_at_every_stage(max_len: int, text32: TextCNN) -> None:
    model = text32 if max_len == 32 else TextCNN(V, max_len=max_len).eval()
    n, length = 3, max_len
    assert len(model.blocks) == 3 + 4 + 6 + 1
    seen: dict[str, tuple[int, ...]] = {}
    hooks = [model.embed_bn.register_forward_hook(lambda m, i, o: seen.__setitem__("embed", tuple(o.shape)))]
    for name, idx in (("res2", 2), ("res3", 6), ("res4", 12), ("res5", 13)):  # last block of each stage
        hooks.append(model.blocks[idx].register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape))))
    pooled: list[torch.Tensor] = []
    hooks.append(model.fc.register_forward_hook(lambda m, i, o: pooled.append(i[0])))
    tokens = words(n, length)
    tokens[0, 5:] = 0  # some padding
    out = model(tokens)
    for h in hooks:
        h.remove()
    assert seen == {"embed": (n, 300, length), "res2": (n, 256, length), "res3": (n, 512, length // 2),
                    "res4": (n, 1024, length // 4), "res5": (n, 2048, length // 4)}
    assert tuple(pooled[0].shape) == (n, 2048)
    assert set(out) == {"feature", "rank", "logit_input"}
    for key in out:
        assert tuple(out[key].shape) == (n, 2048)
    assert torch.equal(out["rank"], torch.relu(out["feature"]))
    assert torch.equal(out["logit_input"], out["rank"])  # eval mode: dropout off
    assert (out["feature"] < 0).any()  # the test feature is pre-ReLU


def test_dropout_in_train_mode_drops_with_rate(text8: TextCNN) -> None:
    torch.manual_seed(0)
    model = copy.deepcopy(text8).train()
    assert model.dropout.p == 0.75
    out = model(words(8, 8))
    rank, li = out["rank"], out["logit_input"]
    kept = li != 0
    # MatConvNet's rate is the DROP probability (decision 13): survivors scaled by 1 / (1 - 0.75) = 4
    assert torch.allclose(li[kept], 4 * rank[kept])
    frac_kept = kept[rank > 0].float().mean().item()
    assert 0.18 < frac_kept < 0.32


# ------------------------------------------------------------------------------------- parameter count, spec 5

def test_number_of_1x2_convolutions_is_14(text32: TextCNN) -> None:
    convs = [m for m in text32.modules() if isinstance(m, nn.Conv1d) and m.kernel_size == (2,)]
    assert len(convs) == 14
    assert all(m.bias is None and m.padding == (0,) for m in convs)  # padding is done on the left by hand
    assert [m.stride[0] for m in convs] == [1] * 3 + [2] + [1] * 3 + [2] + [1] * 5 + [1]


def test_parameter_count_matches_the_spec_table() -> None:
    vocab = 97
    model = TextCNN(vocab, max_len=32)

    def bottleneck(cin: int, mid: int, cout: int, projection: bool) -> int:
        n = cin * mid + 2 * mid * mid + mid * cout  # 1x1 in->mid, 1x2 mid->mid, 1x1 mid->out (no biases)
        n += 2 * mid + 2 * mid + 2 * cout  # three BNs (gamma, beta)
        if projection:
            n += cin * cout + 2 * cout  # 1x1 shortcut + BN
        return n

    expected = (vocab + 1) * 300 + 300 + 2 * 300  # embedding incl. padding row, bias, BN(300)
    cin = 300
    for blocks, proj_mid, out in ((3, 128, 256), (4, 512, 512), (6, 1024, 1024), (1, 2048, 2048)):
        expected += bottleneck(cin, proj_mid, out, projection=True)
        expected += (blocks - 1) * bottleneck(out, out // 4, out, projection=False)
        cin = out
    expected += 2048 * 2048 + 2 * 2048  # fc5_2 (no bias) + BN
    assert sum(p.numel() for p in model.parameters()) == expected


def test_bottleneck_widths_per_stage(text32: TextCNN) -> None:
    got = [(b.branch[0].in_channels, b.branch[0].out_channels, b.branch[6].out_channels,
            not isinstance(b.shortcut, nn.Identity)) for b in text32.blocks]
    expected = ([(300, 128, 256, True)] + [(256, 64, 256, False)] * 2
                + [(256, 512, 512, True)] + [(512, 128, 512, False)] * 3
                + [(512, 1024, 1024, True)] + [(1024, 256, 1024, False)] * 5
                + [(1024, 2048, 2048, True)])
    assert got == expected


def test_new_bn_layers_have_eps_1e3_and_momentum_005(text32: TextCNN) -> None:
    bns = [m for m in text32.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 1 + 14 * 3 + 4 + 1  # embed, 3 per block, 4 projection shortcuts, fc
    assert all(m.eps == 1e-3 and m.momentum == 0.05 for m in bns)


# ---------------------------------------------------------------------------------- causality, decision 12

def _res2_and_final(model: TextCNN, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    h1 = model.blocks[2].register_forward_hook(lambda m, i, o: got.__setitem__("res2", o))
    h2 = model.blocks.register_forward_hook(lambda m, i, o: got.__setitem__("final", o))
    with torch.no_grad():
        model(tokens)
    h1.remove()
    h2.remove()
    return got["res2"], got["final"]


def test_left_padding_is_causal(text32: TextCNN) -> None:
    base = words(1, 32, seed=3)
    ts = [0, 5, 13, 30, 31]
    rows = [base]
    for t in ts:
        changed = base.clone()
        changed[0, t] = base[0, t] % V + 1  # a different word at position t only
        rows.append(changed)
    res2, final = _res2_and_final(text32, torch.cat(rows))  # eval mode: rows are independent
    tiny = 1e-5  # "unchanged" (rows of one batch may differ in the last bit); real changes are >> 1e-3
    for k, t in enumerate(ts, start=1):
        diff2 = (res2[k] - res2[0]).abs().amax(dim=0)  # (32,)
        assert torch.all(diff2[:t] < tiny), f"word {t} changed earlier outputs (not left-padded only)"
        assert diff2[t] > 1e-3, f"changing the word at {t} did not change the output at {t}"
        # RES2 output t sees words t-3..t only (three 1x2 convs), never later ones
        assert torch.all(diff2[t + 4:] < tiny)
        # after the two stride-2 stages, output o (at L/4) depends on inputs <= 4o only
        difff = (final[k] - final[0]).abs().amax(dim=0)  # (8,)
        early = [o for o in range(8) if 4 * o < t]
        assert torch.all(difff[early] < tiny)
        if t <= 13:
            assert difff[math.ceil(t / 4)] > 1e-3


def test_last_three_positions_never_reach_the_feature(text32: TextCNN) -> None:
    """A consequence of the spec's stride-2 arithmetic (o sees 2o-1, 2o; the shortcut samples even positions):
    with L = 32, RES3 reads RES2 positions -1..30 and RES4 reads RES3 positions -1..14, so words at positions
    29, 30, 31 influence no output (eval mode), while the word at 28 does."""
    base = words(1, 32, seed=4)
    rows = [base]
    for t in (28, 29, 30, 31):
        r = base.clone()
        r[0, t] = base[0, t] % V + 1
        rows.append(r)
    with torch.no_grad():
        feat = text32(torch.cat(rows))["feature"]
    assert (feat[1] - feat[0]).abs().max() > 1e-4
    for k in (2, 3, 4):
        assert torch.allclose(feat[k], feat[0], rtol=0, atol=1e-5)


def test_left_pad_conv_matches_explicit_formula(text32: TextCNN) -> None:
    lp = text32.blocks[3].branch[3]  # the stride-2 1x2 conv of the first RES3 block
    w = lp.conv.weight  # (C, C, 2)
    x = torch.randn(2, w.shape[1], 16)
    y = lp(x)
    assert y.shape == (2, w.shape[0], 8)
    for o in range(8):
        left = x[:, :, 2 * o - 1] if 2 * o - 1 >= 0 else torch.zeros_like(x[:, :, 0])
        ref = left @ w[:, :, 0].T + x[:, :, 2 * o] @ w[:, :, 1].T
        assert torch.allclose(y[:, :, o], ref, atol=1e-4)


@pytest.mark.parametrize("training", [False, True])
def test_rows_layout_candidate_is_the_same_function(text32: TextCNN, training: bool) -> None:
    """bench/text_layout.py times a candidate layout for the text CNN: (N, L, C) rows, every convolution one matrix
    product (``rows_features``). Against the model, in float64, where rounding cannot hide a wrong tap, stride or
    BatchNorm axis: the same features and the same gradient for every parameter, with batch statistics (training)
    and running ones (eval). (A candidate padded on the right instead of the left fails this.)"""
    model = copy.deepcopy(text32).double().train(training)
    tokens = words(6, 32, seed=7)
    tokens[2, 9:] = 0
    ours = text_layout.model_features(model, tokens)  # (N, 2048): the input of the head's BN
    cand = text_layout.rows_features(model, tokens)
    g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = [torch.autograd.grad((out * g).sum(), list(model.parameters()), allow_unused=True) for out in (ours, cand)]
    assert torch.allclose(cand, ours, rtol=1e-10, atol=1e-10)
    for (name, _), a, b in zip(model.named_parameters(), *grads):
        assert (a is None) == (b is None), name
        if a is not None:  # (in training mode the embedding bias's and its BN's beta's are 0 up to ~1e-12)
            assert (b - a).norm() <= 1e-9 * a.norm() + 1e-9, name
    names = [n for n, _ in model.named_parameters()]
    assert grads[0][names.index("embed.weight")].norm() > 1, "a zero gradient would make this test vacuous"


def test_stride2_block_dependencies(text32: TextCNN) -> None:
    """Spec 5: output o of a stride-2 block sees inputs 2o-1 and 2o in the main path; the shortcut samples 2o."""
    block = text32.blocks[3]
    length = 16
    x = torch.randn(1, 256, length)
    with torch.no_grad():
        assert block(x).shape == (1, 512, length // 2)
        base_main, base_short = block.branch(x), block.shortcut(x)
        for p in range(length):
            x2 = x.clone()
            x2[:, :, p] += torch.randn(256)
            main = (block.branch(x2) - base_main).abs().amax(dim=1)[0]
            short = (block.shortcut(x2) - base_short).abs().amax(dim=1)[0]
            assert {o for o in range(length // 2) if main[o] > 1e-5} == \
                   {o for o in range(length // 2) if p in (2 * o - 1, 2 * o)}, p
            assert {o for o in range(length // 2) if short[o] > 1e-5} == \
                   {o for o in range(length // 2) if p == 2 * o}, p


# ---------------------------------------------------------------------------------- embedding, spec 3 / 10.11

def test_word2vec_rows_copied_exactly_and_padding_row_zero() -> None:
    w2v = torch.randn(V, 300) * 0.3
    model = TextCNN(V, max_len=8, word2vec=w2v)
    assert model.embed.weight.shape == (V + 1, 300)
    assert torch.equal(model.embed.weight[1:], w2v)
    assert torch.equal(model.embed.weight[0], torch.zeros(300))
    assert torch.equal(model.embed_bias, torch.zeros(300))  # spec 3: bias initialised to 0
    with pytest.raises(ValueError):
        TextCNN(V, max_len=8, word2vec=torch.randn(V + 1, 300))


def test_padding_row_gets_no_gradient(text8: TextCNN) -> None:
    torch.manual_seed(0)
    model = copy.deepcopy(text8).train()
    tokens = words(4, 8)
    tokens[:, 3:] = 0
    got: list[torch.Tensor] = []  # backward from the (N, 300, L) embedding-stage output keeps the test fast
    h = model.embed_bn.register_forward_hook(lambda m, i, o: got.append(o))
    model(tokens)
    h.remove()
    (got[0] * torch.randn(got[0].shape)).sum().backward()
    grad = model.embed.weight.grad
    assert torch.equal(grad[0], torch.zeros(300))
    used = tokens[tokens > 0].unique()
    assert all(grad[w].abs().sum() > 0 for w in used.tolist())
    assert model.embed_bias.grad.abs().sum() > 0


def test_embedding_bias_is_added_at_padding_positions_too(text32: TextCNN) -> None:
    got: list[torch.Tensor] = []
    h = text32.embed_bn.register_forward_pre_hook(lambda m, i: got.append(i[0]))
    tokens = torch.zeros(2, 32, dtype=torch.long)  # caption 0: all padding
    tokens[1, 4] = 7
    with torch.no_grad():
        text32(tokens)
    h.remove()
    emb = got[0]  # (N, 300, L) = W[word] + b at every position
    b = text32.embed_bias
    assert b.abs().sum() > 0
    for pos in range(32):
        assert torch.equal(emb[0, :, pos], b)
        expected = text32.embed.weight[7] + b if pos == 4 else b
        assert torch.allclose(emb[1, :, pos], expected)
    assert emb[0].abs().sum() > 0  # all-padding caption: non-zero embedding output


# ---------------------------------------------------------------------------------------- pooling, decision 1

def _head_by_hand(model: TextCNN, pooled: torch.Tensor) -> torch.Tensor:
    y = pooled @ model.fc.weight.T
    bn = model.fc_bn
    return (y - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def test_max_pooling_is_default_and_avg_differs(text32: TextCNN) -> None:
    assert text32.pool == "max"
    tokens = words(3, 32, seed=5)
    tokens[0, 10:] = 0
    _, final = _res2_and_final(text32, tokens)  # (3, 2048, 8)
    with torch.no_grad():
        feat_max = text32(tokens)["feature"]
        ref_max = _head_by_hand(text32, torch.stack([final[:, :, o] for o in range(8)], 2).max(2).values)
        avg = TextCNN(V, max_len=32, pool="avg").eval()
        avg.load_state_dict(text32.state_dict())
        feat_avg = avg(tokens)["feature"]
        ref_avg = _head_by_hand(text32, sum(final[:, :, o] for o in range(8)) / 8)
    assert torch.allclose(feat_max, ref_max, atol=1e-4)
    assert torch.allclose(feat_avg, ref_avg, atol=1e-4)
    assert (feat_max - feat_avg).abs().max() > 1e-2


@pytest.mark.parametrize("kwargs, words_in_message", [
    ({"pool": "sum"}, ["max", "avg"]),
    ({"depth": "res18"}, ["res50", "res152"]),
    ({"max_len": 30}, ["4"]),
])
def test_bad_arguments_raise_value_error(kwargs: dict, words_in_message: list[str]) -> None:
    args = {"max_len": 32, **kwargs}
    with pytest.raises(ValueError) as err:
        TextCNN(V, **args)
    for w in words_in_message:
        assert w in str(err.value)


# ------------------------------------------------------------------------------- position shift, spec 2.1 / 8.1

def test_shift_tokens_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    length, n = 10, 50
    lengths = torch.randint(0, length + 1, (n,), generator=g)
    tokens = torch.zeros(n, length, dtype=torch.long)
    offsets = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        k = int(lengths[i])
        tokens[i, :k] = torch.randint(1, V + 1, (k,), generator=g)
        offsets[i] = int(torch.randint(0, length - k + 1, (1,), generator=g))
    got = shift_tokens(tokens, lengths, offsets)
    for i in range(n):
        k, off = int(lengths[i]), int(offsets[i])
        ref = [0] * length
        for j in range(k):
            ref[off + j] = int(tokens[i, j])
        assert got[i].tolist() == ref


def test_all_shifts_matches_loop() -> None:
    length = 6
    lengths = torch.tensor([0, 1, 6, 3])
    tokens = torch.zeros(4, length, dtype=torch.long)
    for i, k in enumerate(lengths.tolist()):
        tokens[i, :k] = torch.arange(1, k + 1) + 10 * i
    shifted, owner = all_shifts(tokens, lengths, length)
    ref_rows, ref_owner = [], []
    for i, k in enumerate(lengths.tolist()):
        for off in range(length + 1 - k):
            row = [0] * length
            row[off:off + k] = tokens[i, :k].tolist()
            ref_rows.append(row)
            ref_owner.append(i)
    assert shifted.tolist() == ref_rows
    assert owner.tolist() == ref_owner
    assert len(ref_rows) == 7 + 6 + 1 + 4


def test_test_feature_is_sum_over_all_shifts(text8: TextCNN) -> None:
    length = 8
    lengths = torch.tensor([0, 1, 8, 3])
    tokens = torch.zeros(4, length, dtype=torch.long)
    g = torch.Generator().manual_seed(2)
    for i, k in enumerate(lengths.tolist()):
        tokens[i, :k] = torch.randint(1, V + 1, (k,), generator=g)
    got = text8.test_feature(tokens, lengths)
    chunked = text8.test_feature(tokens, lengths, max_rows=5)  # 24 shifted rows in chunks of 5
    assert got.shape == chunked.shape == (4, 2048)
    with torch.no_grad():
        for i, k in enumerate(lengths.tolist()):
            rows = []
            for off in range(length + 1 - k):
                row = torch.zeros(length, dtype=torch.long)
                row[off:off + k] = tokens[i, :k]
                rows.append(row)
            feats = text8(torch.stack(rows))["feature"]  # eval mode: rows are independent
            ref = torch.zeros(2048)
            for r in range(len(rows)):
                ref += feats[r]
            assert torch.allclose(got[i], ref, atol=1e-4, rtol=1e-5), i
            assert torch.allclose(chunked[i], ref, atol=1e-4, rtol=1e-5), i
    assert text8.training is False
