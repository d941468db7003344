"""CTC head: projection to the vocabulary and the CTC loss."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

CTC_CONF_KEYS = ("ctc_blank_id",)


class CTC(nn.Module):
    """Linear projection of encoder frames to CTC posteriors.

    Args:
        odim: vocabulary size V.
        encoder_output_size: encoder dimension D.
        dropout_rate: dropout on the encoder output before the projection.
        reduce: sum the loss over the batch and divide by the batch size (WeNet);
            False returns one loss per utterance.
        blank_id: index of the blank symbol (`ctc_conf.ctc_blank_id`).
    """

    def __init__(self, odim: int, encoder_output_size: int, dropout_rate: float = 0.0,
                 reduce: bool = True, blank_id: int = 0):
        super().__init__()
        if not 0 <= blank_id < odim:
            raise ValueError(f"ctc_conf.ctc_blank_id {blank_id} outside vocabulary of size {odim}")
        self.odim = odim
        self.blank_id = blank_id
        self.reduce = reduce
        self.dropout_rate = dropout_rate
        self.ctc_lo = nn.Linear(encoder_output_size, odim)

    def forward(self, hs_pad: torch.Tensor, hlens: torch.Tensor, ys_pad: torch.Tensor,
                ys_lens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """CTC loss.

        Args:
            hs_pad: (B, T, D) encoder output; hlens: (B,) valid frames.
            ys_pad: (B, L) targets padded with any value; ys_lens: (B,).
        Returns:
            (loss: scalar if reduce else (B,), log_probs (B, T, V)).
        """
        logits = self.ctc_lo(F.dropout(hs_pad, p=self.dropout_rate, training=self.training))
        log_probs = logits.log_softmax(dim=2)
        targets = ys_pad.masked_fill(ys_pad < 0, 0)
        loss = F.ctc_loss(log_probs.transpose(0, 1).float(), targets, hlens, ys_lens,
                          blank=self.blank_id, reduction="none", zero_infinity=True)
        if self.reduce:
            loss = loss.sum() / log_probs.size(0)
        return loss, log_probs

    def log_softmax(self, hs_pad: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> CTC log-posteriors (B, T, V)."""
        return F.log_softmax(self.ctc_lo(hs_pad), dim=2)

    def argmax(self, hs_pad: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> most probable token per frame (B, T)."""
        return torch.argmax(self.ctc_lo(hs_pad), dim=2)
