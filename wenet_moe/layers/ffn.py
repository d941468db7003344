"""The feed-forward slot of every encoder and decoder block.

All FFNs of the encoder and both decoders are created by one `FFNFactory`, keyed by
`mlp_type`; `mlp_type: moe` swaps every one of them for an MoE FFN by configuration
alone. Every FFN module has the same call signature:

    ffn(xs: Tensor (B, T, D), route_emb: Tensor, mask_pad: Tensor = empty) -> Tensor (B, T, D)

`route_emb` is the per-frame shared embedding that SpeechMoE routers concatenate to
their input, shape (B, T, E); every other FFN ignores it, and callers pass an empty
tensor (`torch.zeros(0)`) when there is none. `mask_pad` is the bool (B, 1, T) mask of
valid (non-padding) frames, or an empty tensor when all are valid; the MoE capacity
limit counts and keeps valid frames only, other FFNs ignore it.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from wenet_moe.layers.activation import get_activation
from wenet_moe.layers.moe import MoEFactory

DENSE_TYPES = ("position_wise_feed_forward", "dense")
MOE_TYPES = ("moe",)


class PositionwiseFeedForward(nn.Module):
    """Dense FFN: w_2(dropout(activation(w_1(x)))), (B, T, D) -> (B, T, D).

    Args:
        idim: model dimension D.
        hidden_units: inner dimension.
        dropout_rate: dropout after the activation.
        activation: activation module.
    """

    def __init__(self, idim: int, hidden_units: int, dropout_rate: float,
                 activation: Optional[nn.Module] = None):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.activation = activation if activation is not None else nn.ReLU()
        self.dropout = nn.Dropout(dropout_rate)
        self.w_2 = nn.Linear(hidden_units, idim)

    def forward(self, xs: torch.Tensor, route_emb: torch.Tensor,
                mask_pad: torch.Tensor = torch.ones((0, 0, 0), dtype=torch.bool)) -> torch.Tensor:
        return self.w_2(self.dropout(self.activation(self.w_1(xs))))


class FFNFactory:
    """Builds the FFNs of one encoder or decoder stack.

    Args:
        idim: model dimension D.
        hidden_units: inner dimension of one FFN (of one expert for MoE).
        dropout_rate: FFN dropout.
        activation: activation name (`activation_type`).
        mlp_type: `position_wise_feed_forward` (dense) or `moe`.
        n_expert, n_expert_activated: MoE size and top-k.
        moe_conf: the config's `moe_conf` block (router kind and loss weights).
        frame_embedding: True for the encoder (SpeechMoE routers see the shared
            frame embedding); False for decoders (routers see the layer input alone).

    One factory per stack: state shared across the stack's layers (the Omni-Router's
    single router) lives in the factory and is handed to every FFN it makes.
    """

    def __init__(self, idim: int, hidden_units: int, dropout_rate: float,
                 activation: str = "relu", mlp_type: str = "position_wise_feed_forward",
                 n_expert: int = 8, n_expert_activated: int = 2,
                 moe_conf: Optional[Dict[str, Any]] = None, frame_embedding: bool = False):
        if mlp_type not in DENSE_TYPES + MOE_TYPES:
            raise ValueError(f"unknown mlp_type '{mlp_type}' (choose from "
                             f"{', '.join(DENSE_TYPES + MOE_TYPES)})")
        self.idim = idim
        self.hidden_units = hidden_units
        self.dropout_rate = dropout_rate
        self.activation = activation
        self.mlp_type = mlp_type
        self.is_moe = mlp_type in MOE_TYPES
        self._moe: Optional[MoEFactory] = None
        if self.is_moe:
            self._moe = MoEFactory(idim, hidden_units, dropout_rate, activation,
                                   n_expert, n_expert_activated, moe_conf or {},
                                   frame_embedding)

    def __call__(self) -> nn.Module:
        """A new FFN module for one block."""
        if self._moe is not None:
            return self._moe()
        return PositionwiseFeedForward(self.idim, self.hidden_units, self.dropout_rate,
                                       get_activation(self.activation))

    def route_embedding(self) -> Optional[nn.Module]:
        """The shared frame-embedding network (SpeechMoE), or None.

        Returned module maps the subsampled input (B, T, D) to (B, T, E); the
        encoder runs it once per forward and passes its output as `route_emb`.
        """
        if self._moe is None:
            return None
        return self._moe.route_embedding()
