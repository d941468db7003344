"""Input layers: convolutional subsampling (4x, 6x, 8x) or a linear projection.

Every input layer: `forward(x (B, T, F), x_mask bool (B, 1, T), offset: int = 0)
-> (x (B, T', D), pos_emb (1, T', D), mask bool (B, 1, T'))`, with attributes
`subsampling_rate` (input frames per output frame) and `right_context` (input frames
after the first one that one output frame needs: its receptive field is
`right_context + 1` frames). The positional encoding module lives inside, as
`pos_enc`, and `position_encoding(offset, size)` is forwarded to it for streaming;
for a batch of streams `forward_offsets(x (B, T, F), offsets (B,) int64) -> x (B, T', D)`
and `position_encoding_offsets(starts (B,), size) -> (B, size, D)`.

The convolutions use no padding, so an output frame depends only on the input
frames `subsampling_rate * t ... subsampling_rate * t + right_context`; in a padded
batch the valid output frames never see padding.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn


class _InputLayer(nn.Module):
    """Shared part: the positional encoding and the streaming accessor."""

    def __init__(self, pos_enc: nn.Module):
        super().__init__()
        self.pos_enc = pos_enc

    @torch.jit.export
    def position_encoding(self, offset: int, size: int) -> torch.Tensor:
        """Encodings of positions offset .. offset+size-1: (1, size, D)."""
        return self.pos_enc.position_encoding(offset, size)

    @torch.jit.export
    def position_encoding_offsets(self, starts: torch.Tensor, size: int) -> torch.Tensor:
        """Encodings of positions starts[b] .. starts[b]+size-1 per stream: (B, size, D)."""
        return self.pos_enc.position_encoding_offsets(starts, size)


class Conv2dSubsampling(_InputLayer):
    """Stack of stride-s Conv2d + ReLU over (time, feature), then a linear layer.

    Args:
        idim: input feature dimension F.
        odim: output dimension D (also the number of conv channels).
        dropout_rate: unused by the convolutions (kept for WeNet's signature);
            dropout is applied by `pos_enc`.
        pos_enc: a positional encoding module (embedding.py).
        layers: (kernel, stride) of each convolution.
    """

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc: nn.Module,
                 layers: List[Tuple[int, int]]):
        super().__init__(pos_enc)
        convs: List[nn.Module] = []
        channels = 1
        feat = idim
        rate = 1
        context = 0
        for kernel, stride in layers:
            convs += [nn.Conv2d(channels, odim, kernel, stride), nn.ReLU()]
            channels = odim
            feat = (feat - kernel) // stride + 1
            context += (kernel - 1) * rate
            rate *= stride
        if feat < 1:
            raise ValueError(f"feature dimension {idim} is too small for "
                             f"{rate}x convolutional subsampling")
        self.conv = nn.Sequential(*convs)
        self.out = nn.Sequential(nn.Linear(odim * feat, odim))
        self.subsampling_rate = rate
        self.right_context = context
        self.layers: List[Tuple[int, int]] = list(layers)

    def subsample(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, T', D) before the positional encoding."""
        if x.size(1) < self.right_context + 1:
            raise ValueError(f"input of {x.size(1)} frames is shorter than the "
                             f"{self.right_context + 1} frames one output frame needs")
        x = self.conv(x.unsqueeze(1))  # (B, C, T', F')
        b, c, t, f = x.size()
        return self.out(x.transpose(1, 2).contiguous().view(b, t, c * f))

    @torch.jit.export
    def forward_offsets(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """A batch of streams: x (B, T, F), offsets (B,) int64 position of each
        stream's first output frame -> (B, T', D)."""
        return self.pos_enc.forward_offsets(self.subsample(x), offsets)

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, offset: int = 0
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, pos_emb = self.pos_enc(self.subsample(x), offset)
        for kernel, stride in self.layers:
            x_mask = x_mask[:, :, kernel - 1::stride]
        return x, pos_emb, x_mask


class Conv2dSubsampling4(Conv2dSubsampling):
    """Two 3x3 stride-2 convolutions: 4x, right_context 6."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc: nn.Module):
        super().__init__(idim, odim, dropout_rate, pos_enc, [(3, 2), (3, 2)])


class Conv2dSubsampling6(Conv2dSubsampling):
    """A 3x3 stride-2 and a 5x5 stride-3 convolution: 6x, right_context 10."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc: nn.Module):
        super().__init__(idim, odim, dropout_rate, pos_enc, [(3, 2), (5, 3)])


class Conv2dSubsampling8(Conv2dSubsampling):
    """Three 3x3 stride-2 convolutions: 8x, right_context 14."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc: nn.Module):
        super().__init__(idim, odim, dropout_rate, pos_enc, [(3, 2), (3, 2), (3, 2)])


class LinearNoSubsampling(_InputLayer):
    """Linear + LayerNorm + dropout, no subsampling (rate 1, right_context 0)."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc: nn.Module):
        super().__init__(pos_enc)
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5),
                                 nn.Dropout(dropout_rate))
        self.subsampling_rate = 1
        self.right_context = 0

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, offset: int = 0
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, pos_emb = self.pos_enc(self.out(x), offset)
        return x, pos_emb, x_mask

    @torch.jit.export
    def forward_offsets(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x (B, T, F), offsets (B,) int64 -> (B, T, D)."""
        return self.pos_enc.forward_offsets(self.out(x), offsets)


INPUT_LAYERS = {
    "conv2d": Conv2dSubsampling4,
    "conv2d6": Conv2dSubsampling6,
    "conv2d8": Conv2dSubsampling8,
    "linear": LinearNoSubsampling,
}
