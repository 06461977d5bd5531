"""Self-speculative decoding with the conformer encoder's CTC head (IBM, arXiv 2603.11243).

granite-4.0-1b-speech's encoder has a character-level CTC head whose greedy output drafts the
transcript; the language model then checks the whole draft in one forward pass instead of one pass
per token. Batched, after IBM's published code:
`notebooks/speculative_decoding_notebook.ipynb` (ibm-granite/granite-speech-models) and
`granite/run_eval_speculative.py` (huggingface/open_asr_leaderboard, the script behind the
leaderboard row of granite-4.0-1b-speech):

1. CTC draft: greedy CTC over the encoder output (class 0 is the blank; class c is `chr(c)`), and
   the largest per-frame entropy as its uncertainty.
2. `speculative` (relaxed, IBM's): a non-empty draft whose max entropy is <= `ctc_entropy_threshold`
   is the answer; otherwise one LLM pass over prompt + draft, on logits divided by `logits_scaling`,
   and the draft is the answer if every draft token has probability >= `verify_threshold`;
   otherwise the draft is discarded and the segment is decoded from scratch with `fallback_beams`
   beams (IBM's `fallback()`: `language_model.generate` on the prompt alone, `early_stopping` when
   beams > 1). The paper's abstract says decoding "resumes from the accepted CTC prefix"; IBM's
   released code does not, and its leaderboard figure comes from that code, so this follows it.
3. `speculative-strict` (lossless): a draft token is accepted only where it equals the model's
   greedy choice; the model's own token at the first mismatch comes free, and greedy decoding goes
   on from there. The output is the greedy autoregressive output.

Defaults are the notebook's (`CTC_THRESHOLD = 0.7`, `CONFIDENCE_THRESHOLD = 0.1`, `NUM_BEAMS = 1`).
The leaderboard runs `--ctc_threshold=0.7 --confidence_threshold=0.2 --num_beams=2`
(`granite/submit_jobs.sh`, `run_speculative.sh`); granite-speech-4.1-2b's BPE-draft script uses 0.0,
0.4 and 2 beams, with a BPE CTC head we do not load.

Drafting applies to transcription of languages in Latin script: the CTC head transcribes (it cannot
draft a translation), and its 92 katakana classes have no documented character mapping, so
Japanese, translation and anything else decode autoregressively. Keyword prompts are verified like
any other transcription prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("autoregressive", "speculative-strict", "speculative")
DRAFT_LANGUAGES = frozenset({"en", "fr", "de", "es", "pt"})

# What decided a segment's text, for the run summary.
BY_CTC, BY_VERIFICATION, BY_FALLBACK, BY_AUTOREGRESSIVE = "ctc", "verification", "fallback", "autoregressive"


@dataclass(frozen=True)
class SpeculativeOptions:
    mode: str = "autoregressive"
    ctc_entropy_threshold: float = 0.7  # IBM's notebook: CTC_THRESHOLD (the leaderboard: 0.7)
    verify_threshold: float = 0.1  # IBM's notebook: CONFIDENCE_THRESHOLD (the leaderboard: 0.2)
    fallback_beams: int = 1  # IBM's notebook: NUM_BEAMS (the leaderboard: 2); `speculative` only

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown decoding mode {self.mode!r}; one of {', '.join(MODES)}")
        if self.fallback_beams < 1:
            raise ValueError("fallback_beams must be at least 1")


def draftable(task: str, language: str | None) -> bool:
    """Whether the CTC head can draft this request."""
    return task == "asr" and language in DRAFT_LANGUAGES


def ctc_draft(logits) -> tuple[str, float]:
    """Greedy CTC text and its max frame entropy (inf when the draft is empty) from [frames, classes]."""
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    best = probs.argmax(dim=-1)
    entropy = -(probs * torch.log(probs + 1e-10)).sum(dim=-1)
    collapsed = torch.unique_consecutive(best)
    chars = [int(c) for c in collapsed if int(c) > 0]
    text = "".join(chr(c) for c in chars)
    return text, (float(entropy.max()) if chars else math.inf)


def strict_accepted(draft: list[int], greedy: list[int]) -> int:
    """How many leading draft tokens equal the model's greedy choices."""
    accepted = 0
    for token, choice in zip(draft, greedy):
        if token != choice:
            break
        accepted += 1
    return accepted


def draft_verified(probabilities: list[float], threshold: float) -> bool:
    """IBM's relaxed test: a non-empty draft passes when every token has probability >= `threshold`."""
    return bool(probabilities) and all(probability >= threshold for probability in probabilities)
