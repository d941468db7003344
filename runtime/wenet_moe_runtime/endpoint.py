"""CTC endpoint detection with WeNet's three rules.

A frame counts as silence when its blank posterior exceeds `blank_threshold`
(0.8). An endpoint fires when any rule holds:
- rule 1: `rule1_silence_ms` (5000) of trailing silence, even if nothing was decoded;
- rule 2: `rule2_silence_ms` (1000) of trailing silence after something was decoded;
- rule 3: the utterance reached `rule3_max_utterance_ms` (20000) and something was
  decoded.
A rule with a non-positive value is disabled.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class EndpointConfig:
    blank_threshold: float = 0.8
    rule1_silence_ms: int = 5000
    rule2_silence_ms: int = 1000
    rule3_max_utterance_ms: int = 20000
    enabled: bool = True


class CtcEndpoint:
    """Tracks trailing silence and utterance length of one segment.

    Args:
        config: the rules.
        frame_ms: milliseconds per encoder frame (e.g. 40 for 4x subsampling).
    """

    def __init__(self, config: EndpointConfig, frame_ms: int) -> None:
        self.config = config
        self.frame_ms = int(frame_ms)
        self.reset()

    def reset(self) -> None:
        self.num_frames = 0
        self.trailing_silence_frames = 0

    def update(self, log_probs: np.ndarray, blank_id: int) -> None:
        """Account for a chunk of (T, V) CTC log-posteriors."""
        if log_probs.shape[0] == 0:
            return
        silent = np.exp(log_probs[:, blank_id]) > self.config.blank_threshold
        self.num_frames += int(silent.shape[0])
        speech = np.flatnonzero(~silent)
        if speech.size == 0:
            self.trailing_silence_frames += int(silent.shape[0])
        else:
            self.trailing_silence_frames = int(silent.shape[0] - 1 - speech[-1])

    @property
    def trailing_silence_ms(self) -> int:
        return self.trailing_silence_frames * self.frame_ms

    @property
    def utterance_ms(self) -> int:
        return self.num_frames * self.frame_ms

    def is_endpoint(self, decoded_something: bool) -> bool:
        """True when one of the three rules holds for the frames seen so far."""
        c = self.config
        if not c.enabled:
            return False
        if c.rule1_silence_ms > 0 and not decoded_something \
                and self.trailing_silence_ms >= c.rule1_silence_ms:
            return True
        if c.rule2_silence_ms > 0 and decoded_something \
                and self.trailing_silence_ms >= c.rule2_silence_ms:
            return True
        if c.rule3_max_utterance_ms > 0 and decoded_something \
                and self.utterance_ms >= c.rule3_max_utterance_ms:
            return True
        return False
