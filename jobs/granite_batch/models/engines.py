"""Load any Granite Speech checkpoint with the engine its profile names (profiles.py).

`load_speech_model` is what the model actor calls: an LLM-based checkpoint (`granite_speech`,
`granite_speech_plus`) becomes a model.SpeechModel (engine `transformers`) or a
vllm_engine.VllmSpeechModel (engine `vllm`), a CTC one (`granite_speech5_ctc`) a
ctc.CtcSpeechModel; all answer `generate_segments(items) -> [SegmentResult]`.
"""

from __future__ import annotations

from granite_batch.models.bpe_draft import load_bpe_head
from granite_batch.models.ctc import CtcSpeechModel
from granite_batch.models.hub import ModelLoadError, first_line, load_hint
from granite_batch.models.model import SpeechModel
from granite_batch.models.profiles import CTC, ModelProfile, UnsupportedModel, detect_profile


def model_profile(
    name: str, revision: str | None = None, trust_remote_code: bool = False, override: str | None = None
) -> ModelProfile:
    """The checkpoint's profile, or ModelLoadError when its config cannot be read or is not Granite Speech."""
    try:
        return detect_profile(name, revision, trust_remote_code, override)
    except UnsupportedModel as exc:
        raise ModelLoadError(f"cannot run model {name!r}: {exc}") from None
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {first_line(exc)}; {load_hint(name)}") from None


def engine_problem(engine: str, profile: ModelProfile, word_timestamps: bool = False) -> str | None:
    """Why `engine` cannot serve a model of `profile` in this job, or None when it can."""
    if engine != "vllm":
        return None
    if profile.engine == CTC:
        return (
            f"engine vllm runs the LLM-based models (granite_speech, granite_speech_plus); {profile.name} is a "
            "CTC model: use engine transformers for it"
        )
    if word_timestamps and not profile.word_times:
        # Word times come from the encoder's CTC head (alignment.py), which vLLM does not expose; the plus
        # model tags its own word times ([T:N]) and needs no alignment.
        return (
            f"engine vllm cannot align word times for {profile.name}: alignment reads the encoder's CTC head, "
            "which vLLM does not expose; use engine transformers, or leave word_timestamps off"
        )
    return None


def load_speech_model(
    name: str,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    profile: ModelProfile | None = None,
    engine: str = "transformers",
    **options,
):
    """Load `name` (hub id or folder) with the engine of its profile (detected when not given); an
    LLM-based model with `engine` vllm is decoded by vLLM (vllm_engine.py)."""
    profile = profile or model_profile(name, revision, trust_remote_code)
    problem = engine_problem(engine, profile)
    if problem:
        raise ModelLoadError(problem)
    if engine == "vllm":
        from granite_batch.models.vllm_engine import VllmSpeechModel

        return VllmSpeechModel.load(
            name, revision, device=device, dtype=dtype, trust_remote_code=trust_remote_code, profile=profile, **options
        )
    engine = CtcSpeechModel if profile.engine == CTC else SpeechModel
    speech_model = engine.load(
        name, revision, device=device, dtype=dtype, trust_remote_code=trust_remote_code, profile=profile, **options
    )
    speculative = options.get("speculative")
    if profile.bpe_drafting and speculative is not None and speculative.mode != "autoregressive":
        speech_model.bpe_head = load_bpe_head(name, revision, speech_model.model, speech_model.device)
    return speech_model
