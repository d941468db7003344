"""Conformer convolution module (pointwise-GLU, depthwise conv, norm, act, pointwise).

forward(x (B, T, D), mask_pad bool (B, 1, T) True = valid frame (or (0, 0, 0)),
        cache (B, D, kernel-1) (or (0, 0, 0)), cache_at_valid_end: bool = False)
    -> (y (B, T, D), new_cache)

Causal: the depthwise convolution sees `kernel - 1` past frames (zeros at the start
of an utterance, the cache while streaming) and no future; `new_cache` holds the
last `kernel - 1` depthwise inputs, shape (B, D, kernel-1); with `cache_at_valid_end`
(a batch of streaming chunks right-padded to one length) each row's cache ends at its
last valid frame of `mask_pad` instead of at the padded tail. Symmetric (non-causal):
odd kernel, `(kernel-1)/2` frames each side, `new_cache` is empty, (B, D, 0).

Padded frames are zeroed at the depthwise input (after the GLU), so a valid frame
sees exactly what it would see in an unpadded batch of one: zeros beyond the ends.

`pad_input=True` (encoder_conf `cnn_module_pad: input`) computes what WeNet's module
computes instead: padding frames are zeroed and the causal left context zero-padded at
the module *input*, before pointwise_conv1, so those positions reach the depthwise
convolution as GLU(bias) rather than zeros, and the cache holds the last `kernel - 1`
module inputs (same shape). Imported WeNet models use it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


class ConvolutionModule(nn.Module):
    """Args:
        channels: model dimension D.
        kernel_size: depthwise kernel size.
        activation: activation module (default SiLU/swish).
        norm: "batch_norm" or "layer_norm".
        causal: causal (left-only) depthwise convolution.
        bias: biases on the three convolutions.
        pad_input: zero-pad and mask at the module input as WeNet (module docstring).
    """

    def __init__(self, channels: int, kernel_size: int = 15,
                 activation: Optional[nn.Module] = None, norm: str = "batch_norm",
                 causal: bool = False, bias: bool = True, pad_input: bool = False):
        super().__init__()
        self.pad_input = pad_input
        if norm not in ("batch_norm", "layer_norm"):
            raise ValueError(f"cnn_module_norm must be batch_norm or layer_norm, got '{norm}'")
        if causal:
            padding = 0
            self.lorder = kernel_size - 1
        else:
            if kernel_size % 2 != 1:
                raise ValueError(f"a non-causal convolution needs an odd cnn_module_kernel, "
                                 f"got {kernel_size}")
            padding = (kernel_size - 1) // 2
            self.lorder = 0
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, 1, bias=bias)
        self.depthwise_conv = nn.Conv1d(channels, channels, kernel_size, padding=padding,
                                        groups=channels, bias=bias)
        self.use_layer_norm = norm == "layer_norm"
        self.norm = nn.LayerNorm(channels) if self.use_layer_norm else nn.BatchNorm1d(channels)
        self.pointwise_conv2 = nn.Conv1d(channels, channels, 1, bias=bias)
        self.activation = activation if activation is not None else nn.SiLU()

    def forward(self, x: torch.Tensor,
                mask_pad: torch.Tensor = torch.ones((0, 0, 0), dtype=torch.bool),
                cache: torch.Tensor = torch.zeros((0, 0, 0)),
                cache_at_valid_end: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x.transpose(1, 2)  # (B, D, T)
        if not self.pad_input:
            x = nn.functional.glu(self.pointwise_conv1(x), dim=1)
        has_mask = mask_pad.size(2) > 0
        if has_mask:
            x = x.masked_fill(~mask_pad, 0.0)
        if self.lorder > 0:
            if cache.size(2) == 0:
                x = nn.functional.pad(x, (self.lorder, 0), "constant", 0.0)
            else:
                x = torch.cat((cache.to(x.dtype), x), dim=2)
            if cache_at_valid_end and has_mask:
                # row b's valid frames end at lorder + valid_b of the padded sequence
                valid = mask_pad.to(torch.int64).sum(dim=2)  # (B, 1)
                index = valid + torch.arange(self.lorder, device=x.device).unsqueeze(0)
                new_cache = torch.gather(
                    x, 2, index.unsqueeze(1).expand(x.size(0), x.size(1), self.lorder))
            else:
                new_cache = x[:, :, x.size(2) - self.lorder:]
        else:
            new_cache = torch.zeros((x.size(0), x.size(1), 0), dtype=x.dtype, device=x.device)
        if self.pad_input:
            x = nn.functional.glu(self.pointwise_conv1(x), dim=1)
        x = self.depthwise_conv(x)
        if self.use_layer_norm:
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        else:
            x = self.norm(x)
        x = self.pointwise_conv2(self.activation(x))
        if has_mask:
            x = x.masked_fill(~mask_pad, 0.0)
        return x.transpose(1, 2), new_cache
