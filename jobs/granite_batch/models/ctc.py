"""The CTC engine: Granite Speech 5 (`granite_speech5_ctc`, e.g. granite-speech-5.0-470m-turboctc).

The same interface as model.SpeechModel (`generate_segments` -> SegmentResult), so the inference stage
and the actor pool run it unchanged. No prompt and no language model: a conformer encoder with a CTC
head over BPE units, decoded greedily by the model's own `generate` (argmax per frame, padded frames
set to the blank), as the model card says ("inference is done non-autoregressively with greedy
decoding"); repeats are collapsed and blanks dropped here, the standard greedy CTC rule.

The frame path is collapsed exactly once. The card's reference flow is
`processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)` (transformers
`docs/source/en/model_doc/granite_speech5.md`, and the docstring of `GraniteSpeech5ForCTC.generate`),
and the checkpoint's tokenizer is `ParakeetTokenizer` (transformers `models/auto/tokenization_auto.py`
maps `granite_speech5_ctc` to it; `convert_granite_speech5_to_hf.py` builds it with `pad_token` the
blank `<|blank|>`, id 0), whose `_decode` merges repeated ids and drops the blank itself
(`group_tokens=True` by default). Decoding ids that are already collapsed that way would merge a token
that really repeats ("2000" as `Ġ2 0 0 0` became "20"), so collapsed ids are decoded with
`group_tokens=False` (`decode_ids`). Word times come from the same path, each word's tokens decoded
together by the same tokenizer, so a word is spelled as the text spells it.

Batching is exact: the encoder takes an attention mask, so padded frames do not change the others
(checked: zero difference). The feature extractor, though, zero-pads waveforms before its STFT and
deltas, which changes the last frames of the shorter clips (measured 0.63 on a feature); so each row's
features are made as its own call makes them (ctc_features.batch_features, one pass on the model's
device) and padded as features with their mask. Batched output is then identical to one segment at a
time (tested).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import numpy as np

from granite_batch.models.alignment import words_from_ctc_path
from granite_batch.models.batching import length_batches
from granite_batch.models.ctc_features import batch_features
from granite_batch.models.hub import load_pretrained
from granite_batch.models.model import MIN_SEGMENT_S, SegmentResult
from granite_batch.models.profiles import GRANITE_SPEECH5_CTC, ModelProfile
from granite_batch.models.prompts import Request
from granite_batch.models.quality import emitted_logprob, speech_ratio

DECODED_BY_CTC = "ctc"  # what decided a CTC model's segments, for the run summary
LOGPROB_ROWS = 16  # segments whose frame log-posteriors are computed at once


@dataclass(frozen=True)
class CtcPath:
    """The greedy CTC path of one segment: the label of every encoder frame (blanks included)."""

    frame_ids: list[int]
    frame_s: float  # seconds per encoder frame
    blank_id: int
    frame_logprobs: list[float] | None = None  # log-posterior of each frame's label


class CtcSpeechModel:
    """A Granite Speech 5 CTC model and its processor on one device, ready for batched decoding."""

    def __init__(
        self,
        model,
        processor,
        device: str,
        max_batch_audio_s: float = 480.0,
        max_batch_segments: int | None = None,
        profile: ModelProfile = GRANITE_SPEECH5_CTC,
        **generation_options,
    ):
        # Generation options (budgets, beams, speculative decoding) mean nothing to a CTC model.
        self.model = model
        self.processor = processor
        self.feature_extractor = processor.feature_extractor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.profile = profile
        self.max_batch_audio_s = max_batch_audio_s
        self.max_batch_segments = max_batch_segments
        self.sample_rate_hz = self.feature_extractor.sampling_rate
        self.blank_id = model.config.pad_token_id
        encoder = model.config.encoder_config
        # A feature frame stacks `frame_stacking` mel frames; each subsampling block halves the rate.
        self.frame_s = (
            self.feature_extractor.hop_length
            * self.feature_extractor.frame_stacking
            * 2 ** len(encoder.subsample_layers)
            / self.sample_rate_hz
        )

    @classmethod
    def load(
        cls,
        name: str,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        **options,
    ) -> CtcSpeechModel:
        """Load processor and weights once (hub id or local folder) onto `device`."""
        model, processor, device = load_pretrained("AutoModelForCTC", name, revision, device, dtype, trust_remote_code)
        return cls(model, processor, device, **options)

    def token_budget(self, samples: np.ndarray, request: Request | None = None) -> int:
        """At most one token per encoder frame (a CTC model never stops early or late)."""
        return max(1, int(len(samples) / self.sample_rate_hz / self.frame_s) + 1)

    def generate(self, items: list[tuple[np.ndarray, Request]]) -> list[str]:
        return [result.text for result in self.generate_segments(items)]

    def generate_segments(
        self, items: list[tuple[np.ndarray, Request]], posteriors: bool = False
    ) -> list[SegmentResult]:
        """Transcribe each (16 kHz mono samples, request), in input order, in length-sorted batches of
        at most `max_batch_segments` segments and `max_batch_audio_s` padded seconds. With
        `posteriors` (word times asked for), each result's `words` come straight from the frames of
        its greedy path (alignment.words_from_ctc_path), in seconds from the segment's start."""
        results = [SegmentResult("", None)] * len(items)
        pieces = self._pieces if posteriors else None
        for batch, paths in self._decoded_batches(items):
            width = max(len(path.frame_ids) for path in paths)
            for position, (index, path) in enumerate(zip(batch, paths)):
                ids = collapse(path.frame_ids, self.blank_id)
                text = self.decode_ids(ids).strip()
                words = (
                    None
                    if pieces is None
                    else words_from_ctc_path(
                        path.frame_ids, pieces, path.frame_s, 0.0, self.blank_id, decode=self.decode_ids
                    )
                )
                results[index] = SegmentResult(
                    text,
                    DECODED_BY_CTC,
                    len(ids),
                    False,
                    width,
                    width - len(path.frame_ids),
                    position == 0,
                    avg_logprob=emitted_logprob(path.frame_ids, path.frame_logprobs or [], self.blank_id),
                    words=words,
                    speech_ratio=speech_ratio(path.frame_ids, self.blank_id, path.frame_s),
                )
        return results

    def decode_ids(self, ids: list[int]) -> str:
        """Text of token ids already collapsed (`collapse`): decoded once more, never grouped again."""
        if self._ungrouped_decode is not None:
            blank = self.blank_id
            return self._ungrouped_decode([i for i in ids if i != blank], skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @functools.cached_property
    def _ungrouped_decode(self):
        """For a tokenizer whose decode merges repeated ids itself (ParakeetTokenizer's `group_tokens`):
        its base class's `_decode`. With `group_tokens=False`, ParakeetTokenizer's own `_decode` only
        drops the blank and calls that, but it reads `pad_token_id` (an attribute lookup through
        `__getattr__` and a vocabulary lookup) once per id: 80% of the host's time per segment
        (`benchmarks/bench_gpu_ctc.py` on an H200: the host's share was 22%). The blank is dropped
        here instead; the text is the same (tested). None for tokenizers that do not group."""
        if "group_tokens" not in inspect.signature(self.tokenizer._decode).parameters:
            return None
        return super(type(self.tokenizer), self.tokenizer)._decode

    @functools.cached_property
    def _pieces(self) -> list[str]:
        """Each token id's text, for word times from the greedy path; read from the tokenizer once."""
        return [piece or "" for piece in self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))]

    def frame_paths(self, items: list[tuple[np.ndarray, Request]]) -> list[CtcPath | None]:
        """Each segment's greedy CTC path (a label per encoder frame, and the frame duration), for word
        timings; None for audio too short to hold a word. Same batching as `generate_segments`."""
        paths: list[CtcPath | None] = [None] * len(items)
        for batch, decoded in self._decoded_batches(items):
            for index, path in zip(batch, decoded):
                paths[index] = path
        return paths

    def _decoded_batches(self, items):
        min_samples = int(MIN_SEGMENT_S * self.sample_rate_hz)
        lengths = [len(samples) if len(samples) >= min_samples else None for samples, _ in items]
        for batch in length_batches(lengths, self.max_batch_segments, self.max_batch_audio_s * self.sample_rate_hz):
            yield batch, self._decode([items[i][0] for i in batch])

    def _decode(self, clips: list[np.ndarray]) -> list[CtcPath]:
        import torch

        with torch.inference_mode():
            # Each row exactly as its own processor call makes it, in one pass (see the module docstring).
            inputs, mask = batch_features(self.feature_extractor, clips, self.device, self.model.dtype)
            out = self.model.generate(input_features=inputs, attention_mask=mask, return_dict_in_generate=True)
            frame_ids = out.sequences
            # The valid encoder frames of each row, as the model's own generate masks them.
            valid = self.model._get_output_attention_mask(mask, target_length=frame_ids.shape[1]).sum(-1).tolist()
            rows = frame_ids.tolist()
            # Each frame's label log-posterior, the confidence (quality.emitted_logprob), in float32 a few
            # rows at a time: the whole batch's would be 6 GB at 256 x 30 s over 16,384 units.
            logprobs = []
            for start in range(0, out.logits.shape[0], LOGPROB_ROWS):
                chunk = out.logits[start : start + LOGPROB_ROWS].float()
                logprobs += torch.log_softmax(chunk, dim=-1).max(dim=-1).values.tolist()
        return [CtcPath(row[:n], self.frame_s, self.blank_id, lp[:n]) for row, n, lp in zip(rows, valid, logprobs)]


def collapse(frame_ids: list[int], blank_id: int) -> list[int]:
    """Greedy CTC: merge repeated labels, then drop blanks (`a a _ a` -> `a a`)."""
    out, previous = [], None
    for label in frame_ids:
        if label != previous and label != blank_id:
            out.append(label)
        previous = label
    return out
