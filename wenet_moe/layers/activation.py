"""Activation modules by WeNet's `activation_type` names (used by the dense FFN, the MoE
experts and the convolution module)."""
from __future__ import annotations

from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "hardtanh": nn.Hardtanh,
    "selu": nn.SELU,
}


def get_activation(name: str) -> nn.Module:
    """Activation module by WeNet's `activation_type` name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation_type '{name}' (choose from {', '.join(sorted(ACTIVATIONS))})")
    return ACTIVATIONS[name]()
