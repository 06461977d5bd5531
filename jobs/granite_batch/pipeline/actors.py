"""The model actors Ray Data runs in its pools: a model loaded once per actor, then batches of segment rows
(or transcripts, for the second pass) mapped to their results. Plain classes: Ray constructs them."""

from __future__ import annotations

import logging

import pyarrow as pa

from granite_batch.audio.isolation import CrashTest
from granite_batch.audio.vad import VadOptions
from granite_batch.config import JobConfig, SecondPassOptions
from granite_batch.inference.escalation import (
    Cascade,
    escalate_segments,
    mark_escalations,
)
from granite_batch.inference.routing import RequestFlags
from granite_batch.inference.transcribe import transcribe_segments
from granite_batch.models.engines import load_speech_model
from granite_batch.models.hub import ModelRef
from granite_batch.models.profiles import ModelProfile
from granite_batch.models.speculative import SpeculativeOptions
from granite_batch.pipeline.cluster import JobModel
from granite_batch.second_pass.language_model import LanguageModel
from granite_batch.second_pass.prompts import Prompter
from granite_batch.second_pass.stage import second_pass_table

log = logging.getLogger(__name__)


def segment_options(config: JobConfig, profile: ModelProfile) -> VadOptions:
    """How a model's recordings are cut: config `segmentation`, or (auto) the model profile's `vad`."""
    return VadOptions(vad={"vad": True, "energy": False}.get(config.segmentation, profile.vad))


def load_options(config: JobConfig, device: str) -> dict:
    """What the model actor passes to `load_speech_model`, built once from the job's config."""
    segments, audio_s = config.model_batch(gpu=device.startswith("cuda"))
    generation = config.generation
    return {
        "device": device,
        "dtype": config.dtype,
        "trust_remote_code": config.trust_remote_code,
        "max_new_tokens": generation.max_new_tokens,
        "max_new_tokens_per_audio_s": generation.max_new_tokens_per_audio_s,
        "num_beams": generation.num_beams,
        "repetition_penalty": generation.repetition_penalty,
        "max_batch_audio_s": audio_s,
        "max_batch_segments": segments,
        "speculative": SpeculativeOptions(
            generation.decoding,
            generation.ctc_entropy_threshold,
            generation.verify_threshold,
            generation.fallback_beams,
        ),
    }


def _load(model: JobModel, options: dict):
    """A job model loaded in an actor with the engine its entry names; the exact revision rows are
    labelled with is the one loaded."""
    return load_speech_model(
        model.ref.name, model.ref.revision, profile=model.profile, engine=model.spec.engine or "transformers", **options
    )


class Transcriber:
    """Model actor: loads the model once, then maps batches of segment rows to their texts."""

    def __init__(
        self,
        model: JobModel,
        options: dict,
        flags: RequestFlags,
        run_id: str,
        crash_test: CrashTest | None = None,
        cascade: Cascade | None = None,
    ):
        self.model_ref = model.ref
        self.run_id = run_id
        self.flags = flags
        self.crash_test = crash_test
        self.cascade = cascade
        self.speech_model = _load(model, options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.crash_test is not None:
            self.crash_test.check("model", batch.column("audio").to_pylist())
        table = transcribe_segments(batch, self.speech_model, self.flags)
        n = table.num_rows
        table = table.append_column("model", pa.array([self.model_ref.name] * n, pa.string()))
        table = table.append_column("model_revision", pa.array([self.model_ref.revision] * n, pa.string()))
        table = table.append_column("run_id", pa.array([self.run_id] * n, pa.string()))
        table = table.append_column("segment_model", pa.array([self.model_ref.name] * n, pa.string()))
        cascade = self.cascade
        if cascade is None:
            return table.append_column("escalate_to", pa.nulls(n, pa.int32()))
        return mark_escalations(
            table, batch.column("samples"), cascade.models, cascade.index, cascade.below, cascade.on, self.flags
        )


class Escalator:
    """Model actor of an escalation stage: decodes again the segments an earlier model sent on to it."""

    def __init__(
        self,
        model: JobModel,
        index: int,
        options: dict,
        flags: RequestFlags,
        last: bool,
        crash_test: CrashTest | None = None,
    ):
        self.model_ref = model.ref
        self.index = index
        self.flags = flags
        self.last = last
        self.crash_test = crash_test
        self.speech_model = _load(model, options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.crash_test is not None:
            self.crash_test.check("escalation", batch.column("audio").to_pylist())
        return escalate_segments(batch, self.speech_model, self.index, self.model_ref.name, self.flags, self.last)


def request_flags(config: JobConfig) -> RequestFlags:
    """The job's request settings for rows that leave them unset (routing.py)."""
    # word_timestamps belongs to the word-timings work; read it when the config has it.
    return RequestFlags(config.speakers, config.punctuation, bool(getattr(config, "word_timestamps", False)))


class SecondPassWorker:
    """Language model actor: loads the model once, then maps batches of transcripts to second-pass rows."""

    def __init__(self, options: SecondPassOptions, template_source: str, model_ref: ModelRef, run_id: str, device: str):
        self.options = options
        self.model_ref = model_ref
        self.run_id = run_id
        self.lm = LanguageModel.load(
            options.model,
            options.revision,
            device=device,
            dtype=options.dtype,
            max_new_tokens=options.max_new_tokens,
            batch_size=options.batch_size,
            max_batch_tokens=options.max_batch_tokens,
            context_tokens=options.context_tokens,
        )
        self.prompter = Prompter(self.lm.tokenizer, template_source, options.question)

    def __call__(self, batch: pa.Table) -> pa.Table:
        table = second_pass_table(batch, self.lm, self.prompter)
        n = table.num_rows
        for column, value in [
            ("name", self.options.dataset_name),
            ("model", self.model_ref.name),
            ("model_revision", self.model_ref.revision),
            ("run_id", self.run_id),
        ]:
            table = table.append_column(column, pa.array([value] * n, pa.string()))
        return table
