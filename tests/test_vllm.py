"""`engine: vllm`: what the config refuses (everywhere), and where vLLM is installed (`-m vllm`, run by
.ci/run in the environment .ci/vllm-env builds): vLLM's greedy tokens equal transformers' on the tiny
checkpoints, batched equals one at a time with the package's plugin (and would not without it), and a
whole job on the sample manifest gives the transformers engine's rows."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import SAMPLES, run_cli
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
