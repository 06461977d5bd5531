"""`engine: vllm`: what the config refuses (everywhere), and where vLLM is installed (`-m vllm`, run by
.ci/run in the environment .ci/vllm-env builds): vLLM's greedy tokens equal transformers' on the tiny
checkpoints, batched equals one at a time with the package's plugin (and would not without it), and a
whole job on the sample manifest gives the transformers engine's rows."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, SAMPLES, run_cli
from granite_batch.config import ConfigError, load_config
from granite_batch.models import profiles
from granite_batch.models.engines import engine_problem
from granite_batch.models.hub import ModelLoadError

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _config(**fields):
    return load_config(overrides={"manifest": "m.jsonl", "output": "out", **fields})


def test_a_models_entry_takes_the_jobs_engine_unless_it_names_its_own():
    config = _config(engine="vllm", models=[{"model": "a"}, {"model": "b", "engine": "transformers"}])
    assert [spec.engine for spec in config.model_specs()] == ["vllm", "transformers"]
    assert [spec.engine for spec in _config(model="a").model_specs()] == ["transformers"]


@pytest.mark.parametrize(
    "generation, named",
    [({"decoding": "speculative"}, "decoding speculative"), ({"num_beams": 2}, "num_beams 1")],
)
def test_vllm_refuses_decoding_it_cannot_do(generation, named):
    with pytest.raises(ConfigError, match=named):
        _config(engine="vllm", generation=generation)
    with pytest.raises(ConfigError, match="engine vllm"):
        _config(models=[{"model": "a", "engine": "vllm"}], generation=generation)
    assert _config(generation=generation).engine == "transformers"


def test_vllm_serves_the_llm_models_only_and_aligns_no_words():
    assert "CTC model" in engine_problem("vllm", profiles.GRANITE_SPEECH5_CTC)
    assert engine_problem("transformers", profiles.GRANITE_SPEECH5_CTC) is None
    assert engine_problem("vllm", profiles.GRANITE_SPEECH) is None
    assert "word times" in engine_problem("vllm", profiles.GRANITE_SPEECH, word_timestamps=True)
    # The plus model tags its own word times: no alignment needed.
    assert engine_problem("vllm", profiles.GRANITE_SPEECH_PLUS, word_timestamps=True) is None


def test_run_refuses_a_ctc_model_on_vllm_before_any_work(tiny_ctc_dir, tmp_path):
    result = run_cli(
        ["run", "--manifest", str(SAMPLES / "manifest.jsonl"), "--output", str(tmp_path / "out")]
        + ["--model", str(tiny_ctc_dir), "--engine", "vllm", "--device", "cpu"]
    )
    assert result.returncode == 2, result.stderr
    assert "engine vllm" in result.stderr and "CTC model" in result.stderr
    assert not (tmp_path / "out" / "transcripts").exists()


@pytest.mark.skipif(HAS_VLLM, reason="checks the message where vLLM is missing")
def test_without_vllm_the_engine_says_how_to_get_it(tiny_model_dir):
    from granite_batch.models.engines import load_speech_model

    with pytest.raises(ModelLoadError, match="vllm-env"):
        load_speech_model(str(tiny_model_dir), engine="vllm", device="cpu")


# Where vLLM is installed. The checkpoints are written by the project's main environment (its
# transformers, 5.24): vLLM's pinned transformers (5.19) saves the language model under a key prefix
# vLLM cannot load. The transformers reference runs here, in vLLM's transformers, in the same process.
MAIN_PYTHON = os.environ.get("GRANITE_BATCH_MAIN_PYTHON", str(REPO / ".venv" / "bin" / "python"))
LLM_TYPES = ("granite_speech", "granite_speech_plus")


@pytest.fixture(scope="module")
def vllm_checkpoints(tmp_path_factory) -> dict[str, str]:
    """Tiny checkpoints vLLM's CPU attention runs (head_dim 32), one per LLM model type."""
    written = {}
    for model_type in LLM_TYPES:
        directory = tmp_path_factory.mktemp(f"vllm-{model_type}")
        result = subprocess.run(
            [MAIN_PYTHON, "-m", "granite_batch.cli", "tiny-model", str(directory)]
            + ["--model-type", model_type, "--head-dim", "32"],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTHONPATH": str(REPO / "jobs")},
        )
        assert result.returncode == 0, result.stderr
        written[model_type] = str(directory)
    return written


@pytest.fixture(scope="module")
def clips():
    """Segments of different lengths, languages and prompts, as the inference stage passes them."""
    from granite_batch.audio.decode import load_recording
    from granite_batch.models.prompts import Request

    en = load_recording(str(SAMPLES / "en_weather.flac")).samples
    fr = load_recording(str(SAMPLES / "fr_gare.mp3")).samples
    ja = load_recording(str(SAMPLES / "ja_tenki.flac")).samples
    return [
        (en[:16_000], Request("asr", "en")),
        (en[:24_000], Request("asr", "en")),
        (en[8_000:39_000], Request("asr", "en")),
        (fr[:20_000], Request("asr", "fr")),
        (fr[:20_000], Request("ast", "fr", "en")),
        (ja[:28_000], Request("asr", "ja")),
    ]


@pytest.mark.vllm
@pytest.mark.parametrize("model_type", LLM_TYPES)
def test_vllm_equals_transformers_and_batching_changes_nothing(vllm_checkpoints, clips, model_type, monkeypatch):
    from granite_batch.models import vllm_plugin
    from granite_batch.models.engines import load_speech_model

    # One engine in this process (no engine-core subprocess), so the plugin can be taken out below.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    directory = vllm_checkpoints[model_type]
    if model_type == "granite_speech_plus":
        # A speaker session's later call: the transcript so far continues the assistant's turn.
        from granite_batch.models.prompts import Request

        en = clips[2][0]
        clips = [*clips, (en, Request("asr", "en", speakers=True, prefix_text="[Speaker 1]: the weather"))]
    options = {"device": "cpu", "dtype": "float32", "max_new_tokens": 24}
    reference = load_speech_model(directory, max_batch_segments=1, **options).generate_segments(clips)
    served = load_speech_model(
        directory, engine="vllm", engine_args={"enable_prefix_caching": False}, max_batch_segments=8, **options
    )
    # vLLM itself loaded the plugin, from the package's entry point.
    from vllm.model_executor.models.granite_speech import GraniteSpeechForConditionalGeneration

    assert GraniteSpeechForConditionalGeneration.embed_multimodal is vllm_plugin._embed_by_length
    # Each phase names its audio afresh, so vLLM encodes it again instead of reusing its encoder cache.
    ids = [[f"{phase}-{i}" for i in range(len(clips))] for phase in ("alone", "batched", "stock")]
    alone = [served.generate_segments([clip], audio_ids=[ids[0][i]])[0] for i, clip in enumerate(clips)]
    batched = served.generate_segments(clips, audio_ids=ids[1])

    assert len({result.text for result in reference}) == len(clips)  # the tiny model listens
    for ours, theirs in zip(alone, reference):
        assert (ours.text, ours.new_tokens, ours.truncated) == (theirs.text, theirs.new_tokens, theirs.truncated)
        assert ours.avg_logprob == pytest.approx(theirs.avg_logprob, abs=2e-3)
        assert ours.decided_by == theirs.decided_by
    assert [r.text for r in batched] == [r.text for r in alone]
    assert sum(r.first_of_call for r in batched) == 1 and all(r.padded_positions == 0 for r in batched)

    if model_type == "granite_speech":
        # Stock vLLM pads the clips encoded in one step together: the same batch then changes texts.
        vllm_plugin.unregister()
        try:
            stock = served.generate_segments(clips, audio_ids=ids[2])
        finally:
            vllm_plugin.register()
        assert [r.text for r in stock] != [r.text for r in alone]


def _rows(output: Path) -> list[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(output / "transcripts")
    keep = ["id", "text", "segments", "error", "decoded_by", "new_tokens", "truncated"]
    rows = table.select([name for name in keep if name in table.column_names]).to_pylist()
    return sorted(rows, key=lambda row: row["id"])


@pytest.mark.vllm
def test_a_job_on_vllm_gives_the_transformers_engines_rows(vllm_checkpoints, tmp_path):
    common = ["run", "--manifest", str(SAMPLES / "manifest.jsonl"), "--model", vllm_checkpoints["granite_speech"]]
    common += ["--device", "cpu", "--dtype", "float32", "--max-new-tokens", "24"]
    env = {"PYTHONPATH": str(REPO / "jobs"), "VLLM_CPU_KVCACHE_SPACE": "1"}
    # The transformers engine in the project's main environment, vLLM here.
    transformers_run = subprocess.run(
        [MAIN_PYTHON, "-m", "granite_batch.cli", *common, "--output", str(tmp_path / "t")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **env},
    )
    assert transformers_run.returncode == 0, transformers_run.stderr[-3000:]
    vllm_run = run_cli([*common, "--output", str(tmp_path / "v"), "--engine", "vllm"], timeout=900, env=env)
    assert vllm_run.returncode == 0, vllm_run.stderr[-3000:]
    ours, theirs = _rows(tmp_path / "v"), _rows(tmp_path / "t")
    assert len(ours) == 8 and all(row["error"] is None and row["text"] for row in ours)
    assert ours == theirs
