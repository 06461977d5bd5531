"""The job's one typed configuration, built at the edge in layers (layers.py): defaults < YAML < env < flags."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from granite_batch.layers import (
    ConfigError,
    Origins,
    format_validation_error,
    merge,
    parse_set,
    read_environment,
    read_yaml,
    variable,
)
from granite_batch.models.prompts import ASR_LANGUAGES, AST_PAIRS, AUTO_LANGUAGE, LANGUAGE_NAMES

DEFAULT_MODEL = "ibm-granite/granite-4.0-1b-speech"
# The output root's lease (run/lease.py): taken over when unrenewed this long; how long a run waits for it.
DEFAULT_EXPIRY_S = 600.0
DEFAULT_WAIT_S = 3600.0
# The second pass's language model: Granite 4.0 Micro, the 3B dense instruct model (Apache 2.0).
DEFAULT_LM_MODEL = "ibm-granite/granite-4.0-micro"
SECOND_PASS_TEMPLATES = ("summary", "topics", "qa")
# Speech segments per generate() call when the job does not say.
GPU_BATCH_SEGMENTS = 256
CPU_BATCH_SEGMENTS = 32
# What decodes an LLM-based model (docs/reference/models.md, "Engines"): transformers' generate, or vLLM.
ENGINE_HELP = (
    "transformers: transformers' generate (every feature); vllm: vLLM's continuous batching "
    "(granite_speech and granite_speech_plus only; greedy autoregressive decoding, no CTC-head word "
    "alignment; needs vLLM installed: how-to 'Run with vLLM'); null in a models: entry: the job's engine"
)


class _Strict(BaseModel):
    # NaN or inf for a number is refused as "a finite number", not with a message about a bound.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class GenerationOptions(_Strict):
    """Decoding settings: greedy as the model card; the token budget follows each segment's length."""

    max_new_tokens: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="cap on any segment's new tokens; null: no cap beyond the per-second budget",
    )
    max_new_tokens_per_audio_s: float | None = Field(
        12.0,
        gt=0,
        description="a segment's budget is 16 tokens + this per audio second (at most max_new_tokens); "
        "null: max_new_tokens for every segment",
    )
    num_beams: int = Field(1, ge=1, le=16)
    repetition_penalty: float = Field(1.0, gt=0)
    decoding: Literal["autoregressive", "speculative-strict", "speculative"] = "autoregressive"
    # speculative: IBM's relaxed procedure (models/speculative.py). Unset thresholds are each model's
    # published Open ASR leaderboard values (models/profiles.py): 4.0 0.7/0.2/2 beams, 4.1 0.0/0.4/2.
    ctc_entropy_threshold: float | None = Field(
        None,
        ge=0,
        description="speculative: take a CTC draft whose max frame entropy is at most this; default: the model's",
    )
    verify_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="speculative: a verified draft has every token at least this probable; default: the model's",
    )
    fallback_beams: int | None = Field(
        None,
        ge=1,
        le=16,
        description="speculative: beams when a rejected draft is decoded from scratch; default: the model's",
    )

    @model_validator(mode="after")
    def _some_budget(self) -> GenerationOptions:
        if self.max_new_tokens is None and self.max_new_tokens_per_audio_s is None:
            raise ValueError("give max_new_tokens, max_new_tokens_per_audio_s or both")
        return self

    @model_validator(mode="after")
    def _greedy_for_speculation(self) -> GenerationOptions:
        if self.decoding != "autoregressive" and (self.num_beams != 1 or self.repetition_penalty != 1.0):
            raise ValueError(f"decoding {self.decoding} needs num_beams 1 and repetition_penalty 1.0")
        return self


class Resources(_Strict):
    """How the job asks Ray for resources."""

    decode_cpus: float = Field(0.5, gt=0, description="CPUs per decode/segment task")
    model_actors_min: int = Field(1, ge=1, description="smallest size of the model actor pool")
    model_actors_max: int | None = Field(
        None,
        ge=1,
        description="largest size of the model actor pool; default: as many actors as the cluster's GPUs "
        "hold (shared among the job's models), 1 without GPUs",
    )
    gpus_per_actor: float | None = Field(
        None,
        ge=0,
        description="GPUs per model actor; default 1 when the cluster has a GPU for each of the job's models, "
        "a share of them when it has fewer (two models on one GPU: 0.5 each), 0 without GPUs",
    )
    cpus_per_actor: float | None = Field(
        None,
        gt=0,
        description="CPUs per model actor; default 1, or without GPUs a share of what the planning and decode "
        "tasks leave (they keep one CPU: two models on 2 CPUs get 0.5 each)",
    )
    wait_for_autoscaler: bool = Field(
        False,
        description="start even when the cluster cannot hold the model pools yet (nodes that join on demand, "
        "KubeRay's autoscaler); by default such a job stops before any work, naming what does not fit",
    )
    accelerator_type: str | None = None
    actor_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each model actor needs, e.g. {speech_gpu: 1}"
    )
    object_store_mb: float | None = Field(
        None,
        gt=0,
        description="object store memory the job's pipeline may fill (cluster-wide, MB); decoding "
        "waits while queued recordings and segments hold this much. Default: Ray Data's own share of the store",
    )

    @model_validator(mode="after")
    def _pool_bounds(self) -> Resources:
        if self.model_actors_max is not None and self.model_actors_max < self.model_actors_min:
            raise ValueError("model_actors_max must be >= model_actors_min")
        return self


class ModelSpec(_Strict):
    """One model of a job that names several (`models:`): rows go to the first that serves them."""

    model: str
    revision: str | None = None
    profile: str = Field("auto", description="auto: from the checkpoint's config; or a profile name (profiles.py)")
    engine: Literal["transformers", "vllm"] | None = Field(None, description=ENGINE_HELP)
    resources: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of the job's resources for this model's actor pool, "
        "e.g. {gpus_per_actor: 0.5, model_actors_max: 4}",
    )
    # A cascade (docs/how-to/cascade.md): this model's segments that fall short go on to the next listed
    # model that serves the row's request, which decodes them again.
    escalate_below: float | None = Field(
        None,
        le=0.0,
        description="send on to the next model the segments whose confidence (avg_logprob, a mean "
        "log-probability) is below this, e.g. -0.3",
    )
    escalate_on: list[Literal["low_confidence", "repetition", "truncated", "rate"]] = Field(
        default_factory=list, description="send on to the next model the segments that raise any of these quality flags"
    )

    @property
    def escalates(self) -> bool:
        return self.escalate_below is not None or bool(self.escalate_on)

    @field_validator("resources")
    @classmethod
    def _resource_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = set(value) - set(Resources.model_fields) - {"decode_cpus"}
        if unknown:
            raise ValueError(
                f"unknown resource field(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(set(Resources.model_fields) - {'decode_cpus'}))}"
            )
        return value


class SecondPassOptions(_Strict):
    """A second pass with a Granite language model over committed transcripts (see second_pass.py)."""

    template: str = Field("summary", description="summary | topics | qa, or the path of a Jinja template file")
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="output dataset OUTPUT/second_pass/<name>; default: the template's name or file stem",
    )
    question: str | None = Field(None, description="the question, for template qa (and custom templates)")
    model: str = DEFAULT_LM_MODEL
    revision: str | None = None
    max_new_tokens: int = Field(256, ge=1, le=8192)
    batch_size: int = Field(8, ge=1, description="prompts in one generate() call")
    max_batch_tokens: int = Field(32768, ge=1, description="padded prompt tokens in one generate() call")
    context_tokens: int | None = Field(
        None, ge=64, description="cap on prompt + new tokens; default: the model's max_position_embeddings"
    )
    model_actors: int = Field(1, ge=1, description="language model actors (one GPU each when GPUs exist)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    retry_failed: bool = Field(False, description="also redo transcripts whose second-pass row has an error")

    @model_validator(mode="after")
    def _question_for_qa(self) -> SecondPassOptions:
        if self.template == "qa" and not (self.question or "").strip():
            raise ValueError("template qa needs a question")
        return self

    @property
    def dataset_name(self) -> str:
        """The output dataset's name: `name`, else the template's name or its file's stem."""
        if self.name:
            return self.name
        return self.template if self.template in SECOND_PASS_TEMPLATES else Path(self.template).stem


class JobConfig(_Strict):
    """Everything one run needs. Secrets never live here: credentials come from the environment."""

    manifest: str | None = Field(None, description="manifest file, folder or prefix")
    input: str | None = Field(
        None, description="list recordings instead of a manifest: a prefix or glob, {language} marks the language"
    )
    output: str
    model: str = DEFAULT_MODEL
    revision: str | None = None
    models: list[ModelSpec] = Field(
        default_factory=list,
        description="several models, in order: each row goes to the first that serves it (overrides model/revision)",
    )
    profile: str = Field("auto", description="the model's profile: auto (from its config) or a name in profiles.py")
    engine: Literal["transformers", "vllm"] = Field("transformers", description=ENGINE_HELP)
    speakers: bool = Field(
        False,
        description="speaker-attributed transcripts, where the model labels speakers "
        "(granite-speech-4.1-2b-plus); a row's `speakers` column overrides it",
    )
    speaker_session_s: float = Field(
        1800.0,
        ge=1.0,
        le=7200.0,
        description="with speakers, a recording's calls are decoded in order in sessions of at most this much "
        "audio, each call given the transcript so far (the model's incremental decoding), so speaker numbers "
        "hold through a session; its audio context is capped at the model's speaker limit (9 minutes). A "
        "session is one row of samples in memory (30 minutes: 115 MB)",
    )
    punctuation: bool | None = Field(
        None,
        description="punctuated, capitalised transcripts (granite-speech-4.1-2b); null: wherever the model "
        "can; a row's `punctuation` column overrides it",
    )
    language: str = Field(
        "en",
        description="spoken language where a row does not say, or auto (identified "
        "from the transcript; README, 'Recordings of unknown language')",
    )
    detect_language: bool = Field(
        False,
        description="also identify rows that name their language, counting disagreements in the summary "
        "(the row keeps its own language)",
    )
    language_threshold: float = Field(
        0.5,
        ge=0.1,
        le=1.0,
        # language_id.DEFAULT_THRESHOLD (a test keeps them equal)
        description="identifier probability a language must reach; below it an auto row is und",
    )
    task: Literal["asr", "ast"] = "asr"
    target_language: str | None = None
    keywords: list[str] = Field(default_factory=list)

    batch_size: int | None = Field(
        None,
        ge=1,
        description="speech segments in one generate() call; default 256 on a GPU, 32 on the CPU",
    )
    max_batch_audio_s: float | None = Field(
        None,
        gt=0,
        description="padded audio seconds in one generate() call (bounds memory); default "
        "7680 on a GPU (256 segments of 30 s), 480 on the CPU",
    )
    decode_batch_size: int = Field(
        1,
        ge=1,
        description="recordings per decode call; decoded clips are gathered into blocks for the VAD",
    )
    max_segment_s: float | None = Field(
        None,
        ge=1.0,
        le=540.0,
        description="longest speech segment one model call carries; longer speech is cut in pauses. Default: "
        "the model's own (180 s for granite-speech-4.1-2b-plus, 30 s for the others), never above its "
        "per-call limit",
    )
    segmentation: Literal["auto", "vad", "energy"] = Field(
        "auto",
        description="how recordings are cut for the model: vad (silero finds speech, silence is dropped, long "
        "speech is cut in pauses), energy (no speech detection: everything is kept, cut at most every "
        "max_segment_s in the quietest pause; far less CPU), auto: what the model's profile says (energy for CTC "
        "models, vad for the others)",
    )
    max_duration_s: float = Field(6 * 3600.0, gt=0)
    subtitles: list[Literal["srt", "vtt"]] = Field(
        default_factory=list, description="also write OUTPUT/subtitles/<format>/<id>.<format> from the segments"
    )
    word_timestamps: bool = Field(
        False,
        description="give each ASR segment its words (segments[].words: start, end, text, confidence), "
        "force-aligned to the encoder's CTC posteriors; subtitles then cut their cues at words",
    )
    decode_timeout_s: float = Field(900.0, gt=0, description="longest time one recording may take to decode")
    allowed_prefixes: list[str] = Field(
        default_factory=list, description="if set, recordings outside these URI/path prefixes become error rows"
    )

    @field_validator("allowed_prefixes")
    @classmethod
    def _prefixes_name_something(cls, value: list[str]) -> list[str]:
        # An allow-list given but blank (an empty template variable) must never mean "allow everything".
        kept = [prefix.strip() for prefix in value if prefix and prefix.strip()]
        if value and not kept:
            raise ValueError("allowed_prefixes names no prefix; give at least one, or leave it out")
        return kept

    sample_rate_hz: Literal[16000] = 16000
    reference_column: str | None = Field(
        None,
        description="the manifest column holding reference texts when it is not `reference` (e.g. `text` in "
        "Hugging Face ASR test sets); it is read, and written, as `reference`",
    )
    channels: Literal["mix", "split"] = Field(
        "mix",
        description="mix: downmix every recording to mono; split: segment and transcribe each channel on "
        "its own (for rows without their own `channels`)",
    )

    generation: GenerationOptions = Field(default_factory=GenerationOptions)
    resources: Resources = Field(default_factory=Resources)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    second_pass: SecondPassOptions | None = Field(None, description="after transcription, run this second pass")

    rows_per_file: int = Field(200_000, ge=1, description="rows before a Parquet file is closed")
    commit_interval_s: float = Field(600.0, gt=0, description="seconds before open files are closed")
    max_failed_fraction: float = Field(1.0, ge=0.0, le=1.0)
    stall_warning_s: float = Field(
        600.0,
        gt=0,
        description="a run that finishes no recording for this long says so in its log, with the resources "
        "Ray has free, instead of waiting silently",
    )
    retry_failed: bool = Field(False, description="also redo ids whose committed row has an error")
    redo: list[str] = Field(
        default_factory=list,
        description="also redo ids whose committed row one of these selections holds for, e.g. "
        "'model == ibm-granite/granite-4.0-1b-speech', 'run_id < 20261001 and segments.avg_logprob < -1': "
        "terms `column op value` (== != < <= > >=, is [not] null) joined by `and`; the new row takes the "
        "old one's place (docs: upgrading the archive)",
    )
    output_format: Literal["parquet", "delta"] = Field(
        "parquet",
        description="parquet: hive-partitioned Parquet files under OUTPUT/transcripts; delta: a Delta Lake "
        "table there (the deltalake extra), committed by the table's own log",
    )
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    lease: Literal["auto", "none"] = Field(
        "auto",
        description="auto: hold a lease on each dataset the run writes, so a second run waits or stops "
        "(exclusive create on local/POSIX files, conditional writes on S3; other stores are refused); "
        "none: no lease, one run at a time per output is then up to you",
    )
    lease_expiry_s: float = Field(
        DEFAULT_EXPIRY_S, gt=0, description="a lease unrenewed this long may be taken over (renewed every third of it)"
    )
    lease_wait_s: float = Field(
        DEFAULT_WAIT_S,
        ge=0,
        description="how long a run waits for another run's lease before exiting 4; 0 (--no-wait): not at all",
    )
    storage_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="fsspec options per URI scheme, e.g. {s3: {endpoint_url: ..., anon: true}}; no secrets",
    )

    @field_validator("language")
    @classmethod
    def _language(cls, value: str) -> str:
        if value not in ASR_LANGUAGES and value != AUTO_LANGUAGE:
            raise ValueError(f"unsupported language {value!r}; supported: {' '.join(ASR_LANGUAGES)} or auto")
        return value

    @field_validator("target_language")
    @classmethod
    def _target_language(cls, value: str | None) -> str | None:
        if value is not None and value not in LANGUAGE_NAMES:
            raise ValueError(f"unsupported target language {value!r}; supported: {' '.join(LANGUAGE_NAMES)}")
        return value

    @model_validator(mode="after")
    def _escalation_has_somewhere_to_go(self) -> JobConfig:
        if self.models and self.models[-1].escalates:
            raise ValueError(f"{self.models[-1].model} escalates, but no model follows it in models")
        return self

    @model_validator(mode="after")
    def _one_source(self) -> JobConfig:
        if (self.manifest is None) == (self.input is None):
            raise ValueError("give exactly one of manifest (a manifest file) or input (a prefix/glob to list)")
        return self

    @model_validator(mode="after")
    def _task_pair(self) -> JobConfig:
        if self.task == "ast":
            if self.target_language is None:
                raise ValueError("task ast needs target_language")
            if self.language == AUTO_LANGUAGE:
                raise ValueError("language auto needs task asr: a translation cannot tell which language was spoken")
            if (self.language, self.target_language) not in AST_PAIRS:
                raise ValueError(f"unsupported translation pair {self.language} -> {self.target_language}")
        return self

    @model_validator(mode="after")
    def _engine_features(self) -> JobConfig:
        # vLLM decodes greedily, one token stream per prompt: IBM's speculative decoding needs the encoder's
        # CTC head and the language model's hidden states, which vllm.LLM does not expose, and its beam
        # search takes no audio. Refused here rather than silently decoded another way.
        if any(spec.engine == "vllm" for spec in self.model_specs()):
            generation = self.generation
            if generation.decoding != "autoregressive":
                raise ValueError(
                    f"engine vllm decodes autoregressively; decoding {generation.decoding} needs the encoder's "
                    "CTC head: use engine transformers for it"
                )
            if generation.num_beams != 1 or generation.repetition_penalty != 1.0:
                raise ValueError(
                    "engine vllm decodes greedily: num_beams 1 and repetition_penalty 1.0 (use engine "
                    "transformers for beam search)"
                )
        return self

    def model_specs(self) -> list[ModelSpec]:
        """The job's models in routing order (`models`, else the one `model`), each with its engine
        (an entry's own, else the job's)."""
        specs = list(self.models) or [ModelSpec(model=self.model, revision=self.revision, profile=self.profile)]
        return [spec if spec.engine else spec.model_copy(update={"engine": self.engine}) for spec in specs]

    def resources_for(self, spec: ModelSpec) -> Resources:
        """The job's resources with `spec`'s overrides."""
        return Resources.model_validate({**self.resources.model_dump(), **spec.resources})

    def model_batch(self, gpu: bool) -> tuple[int, float]:
        """(segments, padded audio seconds) per generate() call: the configured values, else the
        defaults for the device. The leaderboard runs Granite Speech at 128-256 per call on an H200."""
        segments = self.batch_size or (GPU_BATCH_SEGMENTS if gpu else CPU_BATCH_SEGMENTS)
        audio_s = self.max_batch_audio_s or (GPU_BATCH_SEGMENTS * 30.0 if gpu else 480.0)
        return segments, audio_s

    def public_dict(self) -> dict[str, Any]:
        """The configuration as recorded in run summaries (storage options reduced to their keys)."""
        data = self.model_dump(mode="json")
        data["storage_options"] = {scheme: sorted(options) for scheme, options in self.storage_options.items()}
        return data


def load_config(
    yaml_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: Sequence[str] = (),
    environment: bool = False,
) -> JobConfig:
    """Build the config in layers, each over the one before: the defaults, the YAML file, the
    environment (`GRANITE_BATCH_*`, when `environment` is true, as the CLI asks), flag `overrides`
    (None means unset) and `sets` (`--set a.b=VALUE`, in order). Raises ConfigError naming each bad
    field and where its value came from (file and line, variable, flag)."""
    data: dict[str, Any] = {}
    origins: Origins = {}
    sources = []
    if yaml_path is not None:
        loaded, line_of = read_yaml(yaml_path)
        merge(data, loaded, origins, line_of, keep_none=True)
        sources.append(str(yaml_path))
    if environment:
        variables = read_environment(JobConfig)
        merge(data, variables, origins, variable, keep_none=True)
        sources += ["environment"] if variables else []
    merge(data, overrides or {}, origins, lambda path: "command line")
    sources.append("command line")
    for item in sets:
        merge(data, parse_set(item, JobConfig), origins, lambda path, item=item: f"--set {item}", keep_none=True)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, sources, origins)) from exc
