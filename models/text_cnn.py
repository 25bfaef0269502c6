"""The deep text CNN of the dual-path network (spec section 5), and the position shift (spec 2.1, items 5-6).

The sentence is a 1-D sequence of ``max_len`` positions. The first layer is the word2vec "1x1 convolution with bias"
over a one-hot input, i.e. an embedding lookup (padding row fixed at zero) plus a learnable bias added at *every*
position, followed by BatchNorm over 300 channels and no ReLU (decision 11). Then ResNet-like bottleneck stages of
1x2 convolutions padded one position on the left only (decision 12; the numbers are ``models/spec.py``'s
``TEXT_STAGES["res50"]``, the block names ``text_blocks``):

    stage   blocks  projection bottleneck  identity bottleneck  out   stride   length (max_len 32 / 56)
    RES2    3       128                    64                   256   1        32 / 56
    RES3    4       512                    128                  512   2        16 / 28
    RES4    6       1024                   256                  1024  2         8 / 14
    RES5    1       2048                   -                    2048  1         8 / 14

Global max pooling over positions (decision 1; ``pool="avg"`` is the paper figure's variant), then FC 2048->2048
(no bias) + BN: the **test-time text feature** (pre-ReLU, decision 3) -> ReLU: the **ranking feature** -> dropout ->
the shared classifier W (in ``dual_path.py``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from utils.cli import InvalidValue

from . import spec


def new_bn(channels: int, dims: int = 1) -> nn.Module:
    """A newly added BatchNorm layer: eps 1e-3, momentum 0.05, gamma 1, beta 0 (spec 7.2, decision 20)."""
    cls = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    return cls(channels, eps=spec.NEW_BN_EPS, momentum=spec.NEW_BN_MOMENTUM)


def init_new_conv_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Spec 7.2: Uniform(-sqrt(3/fan_in), +sqrt(3/fan_in)) * scale, fan_in = kernel area x input channels."""
    fan_in = weight[0].numel()
    bound = scale * math.sqrt(3.0 / fan_in)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


class LeftPadConv(nn.Module):
    """A 1x2 convolution along the sentence, zero-padded one position on the left only: output t sees t-1 and t."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size=2, stride=stride, bias=False)
        init_new_conv_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, L) -> (N, C, L / stride)
        return self.conv(F.pad(x, (1, 0)))


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv1d:
    conv = nn.Conv1d(cin, cout, kernel_size=1, stride=stride, bias=False)
    init_new_conv_(conv.weight)
    return conv


class Bottleneck(nn.Module):
    """1x1 -> BN -> ReLU -> 1x2 (stride s) -> BN -> ReLU -> 1x1 -> BN, plus shortcut, sum, ReLU."""

    def __init__(self, block: spec.Block) -> None:
        super().__init__()
        cin, mid, cout, stride = block.cin, block.mid, block.cout, block.stride
        self.branch = nn.Sequential(
            conv1x1(cin, mid), new_bn(mid), nn.ReLU(inplace=True),
            LeftPadConv(mid, stride), new_bn(mid), nn.ReLU(inplace=True),
            conv1x1(mid, cout), new_bn(cout),
        )
        # Projection shortcut (1x1, stride s: samples positions 0, 2, ...) in the first block of a stage.
        self.shortcut = (nn.Sequential(conv1x1(cin, cout, stride), new_bn(cout)) if block.projection
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, cin, L) -> (N, cout, L / stride)
        return F.relu(self.branch(x) + self.shortcut(x))


class TextCNN(nn.Module):
    """The text path. ``forward(tokens)`` with tokens (N, max_len) int64 of 1-based word indices, 0 = padding."""

    def __init__(self, vocab_size: int, max_len: int = 32, word2vec: torch.Tensor | None = None,
                 dropout: float = 0.75, pool: str = "max", depth: str = "res50", embed_dim: int = spec.EMBED_DIM,
                 feature_dim: int = 2048, width: float = 1.0) -> None:
        """``width`` scales every stage width (1.0 = the paper); a smaller value is a documented CPU-demo/test
        option, never a paper recipe. ``feature_dim`` is the embedding size (2048 in the paper)."""
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be one of ['max', 'avg'], got {pool!r}")
        if depth not in spec.TEXT_STAGES:
            raise ValueError(f"depth must be one of {sorted(spec.TEXT_STAGES)}, got {depth!r}")
        downsample = spec.text_downsample(depth)
        if max_len % downsample:
            raise InvalidValue(f"max_len must be a multiple of {downsample}, got {max_len}")
        self.vocab_size, self.max_len, self.pool, self.depth = vocab_size, max_len, pool, depth
        # RES1: word2vec "1x1 conv with bias" == embedding lookup (row 0 = padding, fixed at 0) + a bias everywhere.
        self.embed = nn.Embedding(vocab_size + 1, embed_dim, padding_idx=0)
        self.embed_bias = nn.Parameter(torch.zeros(embed_dim))
        if word2vec is not None:
            if tuple(word2vec.shape) != (vocab_size, embed_dim):
                raise ValueError(f"word2vec matrix must be ({vocab_size}, {embed_dim}), got {tuple(word2vec.shape)}")
            with torch.no_grad():
                self.embed.weight[1:].copy_(word2vec)
        else:  # random initialisation (Table 3 ablation): the V->300 1x1 conv's rule, fan_in = V (spec 7.2)
            bound = math.sqrt(3.0 / vocab_size)
            with torch.no_grad():
                self.embed.weight.uniform_(-bound, bound)
        with torch.no_grad():
            self.embed.weight[0].zero_()
        self.embed_bn = new_bn(embed_dim)  # BN over batch x all positions (padding included), no ReLU
        blocks = spec.text_blocks(depth, width, embed_dim)
        self.blocks = nn.Sequential(*[Bottleneck(b) for b in blocks])
        self.fc = nn.Linear(blocks[-1].cout, feature_dim, bias=False)  # fc5_2, a 1x1 conv on the pooled 1x1 map
        init_new_conv_(self.fc.weight)
        self.fc_bn = new_bn(feature_dim)
        self.dropout = nn.Dropout(dropout)  # decision 13: MatConvNet's rate is the DROP probability

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns ``feature`` (pre-ReLU, test time), ``rank`` (post-ReLU) and ``logit_input`` (after dropout)."""
        return self._features(tokens, self.blocks)

    def _features(self, tokens: torch.Tensor, blocks: Callable[[torch.Tensor], torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
        x = self.embed(tokens) + self.embed_bias  # (N, L, 300)
        x = self.embed_bn(x.transpose(1, 2))  # (N, 300, L)
        x = blocks(x)  # (N, 2048, L/4)
        x = x.amax(dim=2) if self.pool == "max" else x.mean(dim=2)  # (N, 2048)
        feature = self.fc_bn(self.fc(x))  # (N, 2048) test-time text feature
        rank = F.relu(feature)  # (N, 2048) ranking feature (L2-normalised in the loss)
        return {"feature": feature, "rank": rank, "logit_input": self.dropout(rank)}

    @torch.no_grad()
    def test_feature(self, tokens: torch.Tensor, lengths: torch.Tensor, max_rows: int = 4096) -> torch.Tensor:
        """Spec 8.1: the pre-ReLU feature summed over ALL position shifts of each caption. (N, L) -> (N, 2048).

        All shifted copies of the whole batch are built at once and encoded in chunks of at most ``max_rows``."""
        shifted, owner = all_shifts(tokens, lengths, self.max_len)  # (S, L), (S,)
        out = torch.zeros(tokens.shape[0], self.fc.out_features, device=tokens.device)
        for start in range(0, shifted.shape[0], max_rows):
            # blocks.forward, not blocks(...): eager even when training compiled them (compile: inductor), as every
            # chunk of shifts has its own shape
            feats = self._features(shifted[start:start + max_rows], self.blocks.forward)["feature"].float()  # (s, 2048)
            out.index_add_(0, owner[start:start + max_rows], feats)
        return out


def shift_tokens(tokens: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Position shift: write each caption's ``length`` words contiguously from ``offset`` (zeros elsewhere).

    tokens (N, L) left-aligned; lengths, offsets (N,) with 0 <= offset <= L - length. Returns (N, L)."""
    n, length = tokens.shape
    pos = torch.arange(length, device=tokens.device).expand(n, length)  # (N, L)
    src = pos - offsets[:, None]  # source position of each output position
    valid = (src >= 0) & (src < lengths[:, None])
    return torch.where(valid, tokens.gather(1, src.clamp(0, length - 1)), torch.zeros_like(tokens))


def all_shifts(tokens: torch.Tensor, lengths: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every shifted copy (offsets 0..L-len) of every caption: returns (S, L) tokens and (S,) owner row indices."""
    counts = max_len + 1 - lengths  # (N,) number of shifts per caption
    owner = torch.repeat_interleave(torch.arange(tokens.shape[0], device=tokens.device), counts)  # (S,)
    first = torch.cumsum(counts, 0) - counts  # (N,) first copy of each caption
    offsets = torch.arange(owner.shape[0], device=tokens.device) - first[owner]  # (S,)
    return shift_tokens(tokens[owner], lengths[owner], offsets), owner
