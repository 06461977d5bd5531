"""Confidence of generated text: the log-probabilities of the tokens greedy decoding chose.

Recorded during generation (no second pass) by a logits processor that runs after transformers'
own: under greedy search the chosen token is the argmax of the scores it sees, so its
log-probability is the maximum of their log-softmax. Scores are divided by what the model's logits
still owe Granite's `logits_scaling` (model.py `_logits_divisor`), so the figures are those of IBM's
reference scoring (`lm_head(h) / logits_scaling`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Below this mean token log-probability (a geometric-mean token probability of about 0.55) a segment
# counts as low confidence in the run summary; Whisper's own fallback threshold is -1.0.
LOW_CONFIDENCE_LOGPROB = -0.6


class ChosenTokenLogprobs:
    """A transformers logits processor for greedy search that records, per step and row, the
    log-probability of the token the step chooses; `rows()` gives them per row after generate."""

    def __init__(self, divisor: float = 1.0):
        self.divisor = divisor
        self._steps: list = []

    def __call__(self, input_ids, scores):
        import torch

        self._steps.append(torch.log_softmax(scores.float() / self.divisor, dim=-1).max(dim=-1).values)
        return scores

    def rows(self) -> list[list[float]]:
        """[row][step] log-probabilities (one device-to-host copy for the whole call)."""
        import torch

        if not self._steps:
            return []
        return torch.stack(self._steps, dim=1).tolist()


def mean_logprob(logprobs: Sequence[float] | None) -> float | None:
    """The mean of a segment's token log-probabilities, None when it has none."""
    if not logprobs:
        return None
    value = sum(logprobs) / len(logprobs)
    return round(value, 4) if math.isfinite(value) else None


def low_confidence(avg_logprob: float | None, threshold: float = LOW_CONFIDENCE_LOGPROB) -> bool:
    """Whether a segment with this mean token log-probability should be checked by a person."""
    return avg_logprob is not None and avg_logprob < threshold
