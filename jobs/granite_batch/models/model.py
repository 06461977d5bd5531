"""Load Granite Speech and run batched, batch-invariant generation.

Batching follows what was measured (docs/explanation/inference.md): the feature extractor zero-pads waveforms before
the mel step and the conformer encoder has no padding mask, so padded audio changes the audio
embeddings. Features and encoder + projector therefore run per recording (or per group of
recordings with identical sample counts and prompts), and only the language model is batched, on
left-padded `inputs_embeds` with an attention mask. Greedy output is then the same as one at a time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from granite_batch.models.batching import length_batches
from granite_batch.models.confidence import ChosenTokenLogprobs, mean_logprob
from granite_batch.models.hub import load_pretrained
from granite_batch.models.profiles import ModelProfile
from granite_batch.models.prompts import Request, render_prompt
from granite_batch.models.speculative import (
    BY_AUTOREGRESSIVE,
    BY_CTC,
    BY_FALLBACK,
    BY_VERIFICATION,
    LEADERBOARD_40,
    SpeculativeOptions,
    ctc_draft,
    draft_verified,
    drafted,
    strict_accepted,
)

log = logging.getLogger(__name__)

# A segment shorter than this holds no word; it gets empty text instead of a model call.
MIN_SEGMENT_S = 0.1
# New tokens any segment may have, on top of `max_new_tokens_per_audio_s` for each of its seconds.
BASE_NEW_TOKENS = 16


@dataclass(frozen=True)
class SegmentResult:
    """What generation made of one segment."""

    text: str
    decided_by: str | None  # see speculative.py; None for audio too short to hold a word
    new_tokens: int = 0
    truncated: bool = False  # stopped at its token budget, not at the end of its text
    positions: int = 0  # language-model positions computed for this segment, padding included
    padded_positions: int = 0
    first_of_call: bool = False  # the first segment of its generate call: these count the calls
    avg_logprob: float | None = None  # mean scaled log-probability of its tokens; None where not computed
    # With `posteriors`: the CTC head's log-posteriors over the segment's encoder frames ([frames, classes],
    # a torch tensor on the model's device) and seconds per frame, for word alignment (alignment.py).
    ctc_log_probs: object = None
    frame_s: float | None = None
    # Word times an engine knows itself (a CTC model's greedy path, the plus model's [T:N] tags):
    # alignment.Word items, seconds from the segment's start; they take precedence over alignment.
    words: list | None = None
    speech_ratio: float | None = None  # share of the segment's frames outside pauses (quality.py); CTC only
    # The decoded text before `text` was stripped, where an LLM engine made it: incremental decoding
    # builds the transcript so far from it as the card does (inference/transcribe.py).
    raw_text: str | None = None


class SpeechModel:
    """A Granite Speech model and its processor on one device, ready for batched generation."""

    def __init__(
        self,
        model,
        processor,
        device: str,
        max_new_tokens: int | None = 200,
        num_beams: int = 1,
        repetition_penalty: float = 1.0,
        max_batch_audio_s: float = 480.0,
        speculative: SpeculativeOptions | None = None,
        max_new_tokens_per_audio_s: float | None = None,
        drafter=None,
        max_batch_segments: int | None = None,
        profile: ModelProfile | None = None,
        bpe_head=None,
    ):
        if max_new_tokens is None and max_new_tokens_per_audio_s is None:
            raise ValueError("give max_new_tokens, max_new_tokens_per_audio_s or both")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.repetition_penalty = repetition_penalty
        self.max_batch_audio_s = max_batch_audio_s
        self.max_batch_segments = max_batch_segments
        self.max_new_tokens_per_audio_s = max_new_tokens_per_audio_s
        # The job's mode where this model can draft (else autoregressive), its thresholds where the job
        # sets none (speculative.py; profiles.py `speculative_defaults`).
        can_draft = profile is None or profile.ctc_drafting or profile.bpe_drafting or drafter is not None
        self.speculative = (speculative or SpeculativeOptions()).resolved(
            LEADERBOARD_40 if profile is None else profile.speculative_defaults, can_draft
        )
        if self.speculative.mode != "autoregressive" and (num_beams != 1 or repetition_penalty != 1.0):
            raise ValueError("speculative decoding needs greedy search: num_beams 1, repetition_penalty 1")
        self.sample_rate_hz = processor.audio_processor.sampling_rate
        self.logits_scaling = float(getattr(model.config.text_config, "logits_scaling", 1.0) or 1.0)
        # (samples, request) -> draft token ids, in place of the CTC head's draft (benchmarks and tests
        # use it to force right or wrong drafts); None drafts with the CTC head, as IBM's notebook does.
        self.drafter = drafter
        # What the checkpoint can do and how it is prompted (profiles.py); None: the 4.0-1b prompts.
        self.profile = profile
        # granite-speech-4.1-2b's BPE CTC head (bpe_draft.BpeDraftHead): drafts with it in place of the
        # character head, as IBM's 4.1 script does; None: the character head, where the profile allows.
        self.bpe_head = bpe_head
        self._prompts: dict[Request, str] = {}

    @classmethod
    def load(
        cls,
        name: str,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        **options,
    ) -> SpeechModel:
        """Load processor and weights once (hub id or local folder) onto `device`."""
        model, processor, device = load_pretrained(
            "AutoModelForSpeechSeq2Seq", name, revision, device, dtype, trust_remote_code, attn_implementation="sdpa"
        )
        return cls(model, processor, device, **options)

    def prompt(self, request: Request) -> str:
        if request.prefix_text:  # a transcript so far: one row's own, never cached
            return self._render(request)
        if request not in self._prompts:
            self._prompts[request] = self._render(request)
        return self._prompts[request]

    def _render(self, request: Request) -> str:
        if self.profile is None:
            return render_prompt(self.tokenizer, request)
        return self.profile.render_prompt(self.tokenizer, request)

    def token_budget(self, samples: np.ndarray, request: Request | None = None) -> int:
        """New tokens a segment may generate: the card's budget for the request's prompt mode where the
        profile names one (granite-speech-4.1-2b-plus: 2,000, or 10,000 for word timestamps), at most
        `max_new_tokens` when that is set; else 16 + `max_new_tokens_per_audio_s` per audio second
        (at most `max_new_tokens` when that is set), or `max_new_tokens` alone when the rate is None.

        The budget follows the segment's length with no lower cap, so a 30 s segment of dense speech
        (Japanese, ~8 tokens/s, or an en->ja translation) has room for all of it (12 per second is
        about 1.5x the densest speech and 3x fast English); a segment the model loops on stops about
        where speech of its length must have ended. IBM's card uses 200 new tokens for short clips;
        our segments run to `max_segment_s`. A segment that stops at its budget is marked `truncated`.
        """
        card = None if self.profile is None or request is None else self.profile.new_tokens(request)
        if card is not None:
            return card if self.max_new_tokens is None else min(self.max_new_tokens, card)
        if self.max_new_tokens_per_audio_s is None:
            return self.max_new_tokens
        seconds = len(samples) / self.sample_rate_hz
        budget = BASE_NEW_TOKENS + math.ceil(self.max_new_tokens_per_audio_s * seconds)
        return budget if self.max_new_tokens is None else min(self.max_new_tokens, budget)

    def generate(self, items: list[tuple[np.ndarray, Request]]) -> list[str]:
        """Transcribe or translate each (16 kHz mono samples, request); results in input order."""
        return [result.text for result in self.generate_segments(items)]

    def generate_with_decisions(self, items: list[tuple[np.ndarray, Request]]) -> list[tuple[str, str | None]]:
        """Like `generate`, with what decided each text (see speculative.py; None for too-short audio)."""
        return [(result.text, result.decided_by) for result in self.generate_segments(items)]

    def generate_segments(
        self, items: list[tuple[np.ndarray, Request]], posteriors: bool = False
    ) -> list[SegmentResult]:
        """Like `generate`, with each segment's decoding facts: what decided it, its new tokens, whether
        it stopped at its budget, its share of the language model's (padded) positions, its mean token
        log-probability, and with `posteriors` its CTC log-posteriors for word alignment.

        Items are sorted by length and cut into language-model batches of at most
        `max_batch_segments` items and `max_batch_audio_s` padded audio seconds, so a batch pads to
        items of similar length. Results do not depend on the batching (tested).
        """
        results = [SegmentResult("", None)] * len(items)
        min_samples = int(MIN_SEGMENT_S * self.sample_rate_hz)
        lengths = [len(samples) if len(samples) >= min_samples else None for samples, _ in items]
        for batch in length_batches(lengths, self.max_batch_segments, self.max_batch_audio_s * self.sample_rate_hz):
            self._generate_batch(items, batch, results, posteriors)
        return results

    def _generate_batch(self, items, batch: list[int], results: list, posteriors: bool = False) -> None:
        import torch

        # Drafts are computed only by a model that makes them (a 4.1 checkpoint without its BPE head does not).
        speculative = self.speculative.mode != "autoregressive" and self._drafts
        with torch.inference_mode():
            embeds, draft_logits, ctc_logits = self._encode(items, batch, speculative, posteriors)
            requests = [items[i][1] for i in batch]
            budgets = [self.token_budget(*items[i]) for i in batch]
            if speculative:
                drafts = [self._draft(items[i], logits) for i, logits in zip(batch, draft_logits)]
                tokens, decisions, logprobs = self._speculative(embeds, requests, drafts, budgets)
            else:
                logprobs: list = []
                tokens = self._autoregressive(embeds, budgets, logprobs_out=logprobs)
                decisions = [BY_AUTOREGRESSIVE] * len(batch)
            log_posteriors = [
                torch.log_softmax(logits.float(), dim=-1) if posteriors and logits is not None else None
                for logits in ctc_logits
            ]
        frame_s = self._frame_s if posteriors else None
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        # Positions the language model computed for this batch: the left-padded prompts, then one per
        # row at each decoding step until the longest row stops (its eos included).
        prompt_width = max(e.shape[0] for e in embeds)
        steps = max(min(len(t) + 1, b) for t, b in zip(tokens, budgets))
        for position, (index, text, decision, row_tokens, row_budget, embed) in enumerate(
            zip(batch, texts, decisions, tokens, budgets, embeds)
        ):
            truncated = len(row_tokens) >= row_budget  # no eos within the budget
            useful = embed.shape[0] + min(len(row_tokens) + (0 if truncated else 1), steps)
            results[index] = SegmentResult(
                text.strip(),
                decision,
                len(row_tokens),
                truncated,
                prompt_width + steps,
                prompt_width + steps - useful,
                position == 0,
                mean_logprob(logprobs[position]),
                log_posteriors[position],
                frame_s,
                raw_text=text,
            )

    @functools.cached_property
    def _frame_s(self) -> float:
        """Seconds per encoder frame: two mel hops are stacked into one frame."""
        from granite_batch.models.alignment import encoder_frame_s

        return encoder_frame_s(self.processor.audio_processor)

    def _left_pad(self, sequences: list):
        """Stack [length, hidden] embeddings into a left-padded batch with its attention mask."""
        import torch

        width = max(e.shape[0] for e in sequences)
        inputs = torch.zeros(
            (len(sequences), width, sequences[0].shape[1]), dtype=sequences[0].dtype, device=self.device
        )
        mask = torch.zeros((len(sequences), width), dtype=torch.long, device=self.device)
        for row, e in enumerate(sequences):
            inputs[row, width - e.shape[0] :] = e
            mask[row, width - e.shape[0] :] = 1
        return inputs, mask

    def _autoregressive(
        self, embeds: list, budgets: list[int], num_beams: int | None = None, logprobs_out: list | None = None
    ) -> list[list[int]]:
        """Greedy (or beam) generation on left-padded prompt embeddings; at most `budgets[row]` new
        tokens per row (the batch runs to the largest; batches are formed from similar lengths).
        `logprobs_out` gets, per row, its tokens' scaled log-probabilities under greedy search (None
        with beams, whose chosen tokens are not the steps' argmax)."""
        from transformers import LogitsProcessorList

        num_beams = self.num_beams if num_beams is None else num_beams
        inputs, mask = self._left_pad(embeds)
        eos = self.tokenizer.eos_token_id
        # Beams score log-softmax sums, which change with the logits' scale (greedy's argmax does not),
        # and transformers' beam search applies logits processors after its log-softmax, so the
        # division happens on the model's output (see `_scaled_logits`). IBM's fallback() passes
        # early_stopping=num_beams > 1 and the tokenizer's eos, not the checkpoint's generation config's.
        scaled = self._scaled_logits() if num_beams > 1 else contextlib.nullcontext()
        # Greedy: the chosen tokens' log-probabilities, recorded as they are chosen (confidence.py).
        recorder = ChosenTokenLogprobs(self._logits_divisor) if num_beams == 1 else None
        with scaled:
            tokens = self.model.generate(
                inputs_embeds=inputs,
                attention_mask=mask,
                max_new_tokens=max(budgets),
                num_beams=num_beams,
                early_stopping=num_beams > 1,
                do_sample=False,
                repetition_penalty=self.repetition_penalty,
                eos_token_id=eos,
                pad_token_id=self.tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([recorder] if recorder else []),
            )
        out = []
        for row, budget in zip(tokens.tolist(), budgets):
            row = row[:budget]
            if eos in row:
                row = row[: row.index(eos)]
            out.append([t for t in row if t != self.tokenizer.pad_token_id])
        if logprobs_out is not None:
            steps = recorder.rows() if recorder else []
            logprobs_out.extend(steps[row][: len(row_tokens)] if steps else None for row, row_tokens in enumerate(out))
        return out

    @functools.cached_property
    def _logits_divisor(self) -> float:
        """What the model's logits must still be divided by to be Granite's scaled logits.

        Granite's language model divides `lm_head` output by `logits_scaling` (8 for 4.0-1b);
        IBM's reference code scores `lm_head(h) / logits_scaling`. transformers 5.24's
        GraniteSpeechForConditionalGeneration returns `lm_head(h)` undivided (tests pin this). One
        probe forward pass decides, so a later upstream fix is not divided twice.
        """
        if self.logits_scaling == 1.0:
            return 1.0
        import torch

        head = self.model.get_output_embeddings()
        seen = []
        handle = head.register_forward_hook(lambda module, args, output: seen.append(output))
        try:
            with torch.inference_mode():
                ids = torch.tensor([self.tokenizer.encode("a b c", add_special_tokens=False)], device=self.device)
                logits = self.model(inputs_embeds=self.model.get_input_embeddings()(ids), use_cache=False).logits
        finally:
            handle.remove()
        raw = seen[-1].float()
        undivided = (logits.float() - raw).abs().max()
        divided = (logits.float() - raw / self.logits_scaling).abs().max()
        return self.logits_scaling if undivided <= divided else 1.0

    @contextlib.contextmanager
    def _scaled_logits(self):
        """Within: the model's logits are Granite's scaled logits (`lm_head(h) / logits_scaling`)."""
        divisor = self._logits_divisor
        if divisor == 1.0:
            yield
            return
        handle = self.model.get_output_embeddings().register_forward_hook(lambda module, args, output: output / divisor)
        try:
            yield
        finally:
            handle.remove()

    @property
    def _drafts(self) -> bool:
        """Whether this model makes drafts: a character head the profile drafts with, or the BPE head."""
        return (
            self.profile is None or self.profile.ctc_drafting or self.bpe_head is not None or self.drafter is not None
        )

    def _draft(self, item, ctc_logits) -> tuple[list[int] | None, str, float]:
        """(draft token ids or None when this request is not drafted, draft text, max CTC entropy)."""
        samples, request = item
        if not drafted(request) or not self._drafts:
            return None, "", math.inf
        if self.drafter is not None:
            ids = list(self.drafter(samples, request))
            return ids, self.tokenizer.decode(ids), math.inf
        text, entropy = (
            ctc_draft(ctc_logits) if self.bpe_head is None else self.bpe_head.draft(ctc_logits, self.tokenizer)
        )
        text = text.strip()
        return (self.tokenizer.encode(text, add_special_tokens=False) if text else []), text, entropy

    def _speculative(
        self, embeds: list, requests: list[Request], drafts: list, budgets: list[int]
    ) -> tuple[list, list[str], list]:
        """Decide each row by CTC, by one batched verification pass, or by decoding after it
        (speculative.py says how each mode decides). Also returns each row's token log-probabilities
        where the language model scored every token (None for CTC answers and beam fallbacks)."""
        import torch

        n = len(embeds)
        eos = self.tokenizer.eos_token_id
        options = self.speculative
        relaxed = options.mode == "speculative"
        tokens: list[list[int] | None] = [None] * n
        logprobs: list[list[float] | None] = [None] * n
        decisions = [BY_AUTOREGRESSIVE] * n
        prefixes: dict[int, list[int]] = {}  # strict: accepted draft + the model's next token
        for row, (ids, _, entropy) in enumerate(drafts):
            if ids is None:
                continue
            decisions[row] = BY_FALLBACK
            # IBM: `if ent <= ctc_threshold and text.strip(): predictions[i] = text.strip()`
            if relaxed and ids and entropy <= options.ctc_entropy_threshold:
                tokens[row], decisions[row] = ids[: budgets[row]], BY_CTC
        verify = [row for row in range(n) if tokens[row] is None and drafts[row][0]]
        if verify:
            embed_tokens = self.model.get_input_embeddings()
            sequences, lengths = [], []
            for row in verify:
                draft = drafts[row][0][: budgets[row]]
                ids = torch.tensor(draft, dtype=torch.long, device=self.device)
                sequences.append(torch.cat([embeds[row], embed_tokens(ids).to(embeds[row].dtype)]))
                lengths.append(len(draft))
            inputs, mask = self._left_pad(sequences)
            # IBM's verification (run_eval_speculative.py, run_eval_speculative_bpe.py): the language
            # model's hidden states, gathered at the draft's positions, then `lm_head(h) / logits_scaling`,
            # never the full vocabulary at every position (about 22 GB of logits at 256 x 30 s).
            hidden = self.model.model(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state
            width = inputs.shape[1]
            # The last prompt position predicts draft[0]; the draft's last position predicts what follows.
            rows_at = torch.cat([torch.full((length + 1,), at) for at, length in enumerate(lengths)])
            positions_at = torch.cat([torch.arange(width - length - 1, width) for length in lengths])
            gathered = hidden[rows_at.to(hidden.device), positions_at.to(hidden.device)]
            logits = (self.model.get_output_embeddings()(gathered).float() / self.logits_scaling).split(
                [length + 1 for length in lengths]
            )
            for position, (row, length) in enumerate(zip(verify, lengths)):
                draft = drafts[row][0][:length]
                step_logits = logits[position]
                if relaxed:
                    probs = torch.softmax(step_logits[:length], dim=-1)
                    chosen = probs[torch.arange(length), torch.tensor(draft)].tolist()
                    if draft_verified(chosen, options.verify_threshold):
                        tokens[row], decisions[row] = draft, BY_VERIFICATION
                        logprobs[row] = [math.log(max(p, 1e-30)) for p in chosen]
                    continue  # rejected: IBM discards the draft and decodes from scratch below
                greedy = step_logits.argmax(dim=-1).tolist()
                accepted = strict_accepted(draft, greedy[:length])
                following = greedy[accepted]  # the model's own token where the draft stops
                prefix = draft[:accepted] if following == eos else draft[:accepted] + [following]
                scored = torch.log_softmax(step_logits[: len(prefix)], dim=-1)
                logprobs[row] = scored[torch.arange(len(prefix)), torch.tensor(prefix)].tolist()
                if following == eos or len(prefix) >= budgets[row]:
                    # Finished without a single autoregressive step: the verification pass decided it.
                    tokens[row], decisions[row] = prefix[: budgets[row]], BY_VERIFICATION
                    logprobs[row] = logprobs[row][: budgets[row]]
                    continue
                prefixes[row] = prefix
        # The rest decode autoregressively: not drafted (as in autoregressive mode), strict after its
        # prefix, relaxed fallback from scratch with its own beam count (one generate per beam count).
        rest: dict[int, list[int]] = defaultdict(list)
        for row in range(n):
            if tokens[row] is None:
                fallback = relaxed and decisions[row] == BY_FALLBACK
                rest[options.fallback_beams if fallback else self.num_beams].append(row)
        embed_tokens = self.model.get_input_embeddings()
        for num_beams, rows in rest.items():
            sequences, remaining = [], []
            for row in rows:
                prefix = prefixes.get(row, [])
                sequence = embeds[row]
                if prefix:
                    ids = torch.tensor(prefix, dtype=torch.long, device=self.device)
                    sequence = torch.cat([sequence, embed_tokens(ids).to(sequence.dtype)])
                sequences.append(sequence)
                remaining.append(budgets[row] - len(prefix))
            scored: list = []
            generated_rows = self._autoregressive(sequences, remaining, num_beams, scored)
            for row, generated, scores in zip(rows, generated_rows, scored):
                tokens[row] = prefixes.get(row, []) + generated
                logprobs[row] = None if scores is None else (logprobs[row] or []) + scores
        return tokens, decisions, logprobs

    def _prompt_embeddings(self, items, batch: list[int], with_ctc: bool = False) -> tuple[list, list]:
        """Per item: prompt token embeddings with its audio embeddings in place of `<|audio|>` tokens,
        and (with_ctc) the logits its drafts are made from (the BPE head's where loaded, else the
        character head's)."""
        embeds, draft_logits, ctc_logits = self._encode(items, batch, with_ctc, with_ctc and self.bpe_head is None)
        return embeds, draft_logits if self.bpe_head is not None else ctc_logits

    def _encode(self, items, batch: list[int], drafts: bool = False, posteriors: bool = False) -> tuple:
        """Per item: prompt embeddings; with `drafts`, the logits drafts are made from (the BPE head's
        pooled windows where it is loaded, else the character head's frames); with `posteriors`, the
        character CTC head's logits over the encoder's 20 ms frames, which word alignment reads, never
        the pooled BPE head's (alignment.py)."""
        import torch

        groups: dict[tuple[int, Request], list[int]] = defaultdict(list)
        for index in batch:
            samples, request = items[index]
            groups[(len(samples), request)].append(index)
        embeds: dict[int, object] = {}
        ctc: dict[int, object] = {}
        draft: dict[int, object] = {}
        inner = self.model.model
        bpe = drafts and self.bpe_head is not None
        for (_, request), members in groups.items():
            # Equal sample counts and prompts need no padding, so they can share one encoder pass.
            prompt = self.prompt(request)
            waveforms = [torch.tensor(items[i][0]) for i in members]  # a copy: Arrow buffers are read-only
            # The log-mel step runs on the model's device: on one CPU core it takes 1/2200 of the audio's
            # length, so at the GPU throughput we aim for (RTFx 3000) the actor's CPU could not keep up.
            features = self.processor(
                text=[prompt] * len(members), audio=waveforms, return_tensors="pt", device=self.device
            ).to(self.device)
            with self.bpe_head.capture() if bpe else contextlib.nullcontext():
                encoded = inner.encoder(features["input_features"].to(self.model.dtype)).last_hidden_state
            audio = inner.projector(encoded)
            merged = inner.get_merged_audio_embeddings(
                input_ids=features["input_ids"],
                audio_features=audio,
                input_features_mask=features["input_features_mask"],
            )
            # IBM's notebook applies the (shared) CTC head `encoder.out` to the final encoder output. The
            # plus encoder concatenates earlier layers before it (`cat_hidden_layers`): its last
            # `hidden_dim` columns are the final output.
            character = None
            if posteriors or (drafts and not bpe):
                character = inner.encoder.out(encoded[..., -inner.encoder.config.hidden_dim :])
            pooled = self.bpe_head.pooled_logits(encoded, [len(items[i][0]) for i in members]) if bpe else None
            for row, index in enumerate(members):
                embeds[index] = merged[row]
                ctc[index] = character[row] if posteriors and character is not None else None
                if drafts:
                    draft[index] = pooled[row] if pooled is not None else character[row]
        return (
            [embeds[index] for index in batch],
            [draft.get(index) for index in batch],
            [ctc[index] for index in batch],
        )
