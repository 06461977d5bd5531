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

Thresholds are per model (profiles.py `speculative_defaults`), IBM's published values for it, unless
the job sets them: granite-4.0-1b-speech as the leaderboard runs it (`granite/submit_jobs.sh`,
`run_speculative.sh`: `--ctc_threshold=0.7 --confidence_threshold=0.2 --num_beams=2`; the notebook uses
0.7, 0.1 and 1), granite-speech-4.1-2b with its BPE drafts as its leaderboard run
(`--ctc_threshold=0.0 --confidence_threshold=0.4 --num_beams=2`). A model that cannot draft (plus,
TurboCTC) decodes autoregressively whatever the job's mode.

Drafts are made and judged only where IBM does: transcription with the raw ASR prompt
("can you transcribe the speech into a written format?", no keywords; both leaderboard scripts and the
notebook use no other), of languages in Latin script: the CTC head transcribes (it cannot draft a
translation), and its 92 katakana classes have no documented character mapping. A keyword row is
decoded autoregressively, so relaxed mode never takes a draft made without its keywords.
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
    """A decoding mode and its thresholds; a threshold left None is the model's own (`resolved`)."""

    mode: str = "autoregressive"
    ctc_entropy_threshold: float | None = None  # IBM: CTC_THRESHOLD / --ctc_threshold
    verify_threshold: float | None = None  # IBM: CONFIDENCE_THRESHOLD / --confidence_threshold
    fallback_beams: int | None = None  # IBM: NUM_BEAMS / --num_beams; `speculative` only

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown decoding mode {self.mode!r}; one of {', '.join(MODES)}")
        if self.fallback_beams is not None and self.fallback_beams < 1:
            raise ValueError("fallback_beams must be at least 1")

    def resolved(self, defaults: tuple[float, float, int], can_draft: bool = True) -> SpeculativeOptions:
        """These options for one model: its (ctc, verify, beams) `defaults` where unset, and
        autoregressive decoding for a model that cannot draft."""
        ctc, verify, beams = defaults
        return SpeculativeOptions(
            self.mode if can_draft else "autoregressive",
            ctc if self.ctc_entropy_threshold is None else self.ctc_entropy_threshold,
            verify if self.verify_threshold is None else self.verify_threshold,
            beams if self.fallback_beams is None else self.fallback_beams,
        )


# granite-4.0-1b-speech on the Open ASR leaderboard (ctc, verify, fallback beams).
LEADERBOARD_40 = (0.7, 0.2, 2)
# granite-speech-4.1-2b on the leaderboard (`run_eval_speculative_bpe.py`, `submit_jobs.sh`).
LEADERBOARD_41 = (0.0, 0.4, 2)


def draftable(task: str, language: str | None) -> bool:
    """Whether the CTC head can draft this request."""
    return task == "asr" and language in DRAFT_LANGUAGES


def drafted(request) -> bool:
    """Whether a prompts.Request is drafted: the raw ASR prompt, no keywords, a draftable language."""
    return (
        draftable(request.task, request.language)
        and not request.keywords
        and not (request.punctuation or request.speakers or request.word_times)
    )


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
