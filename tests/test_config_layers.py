"""The job config in layers: defaults < YAML < GRANITE_BATCH_* environment < flags < --set, one
precedence whichever way a value arrives; `config show` prints what `run` would use, and reads back."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from conftest import run_cli
from granite_batch.cli import _parser
from granite_batch.cli.common import EXIT_CONFIG, EXIT_MODEL, EXIT_RUNTIME, EXIT_TOO_MANY_FAILURES, exit_code
from granite_batch.cli.run import FLAG_FIELDS, _overrides
from granite_batch.config import ConfigError, JobConfig, load_config

BASE = {"manifest": "m.jsonl", "output": "out"}


def write_yaml(tmp_path, data: dict):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def clean_env(monkeypatch):
    """No GRANITE_BATCH_* variable of the caller's leaks into a test."""
    import os

    for name in [name for name in os.environ if name.upper().startswith("GRANITE_BATCH_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_each_layer_overrides_the_one_below(tmp_path, clean_env):
    config_file = write_yaml(
        tmp_path, {**BASE, "batch_size": 1, "max_segment_s": 11, "language": "fr", "resources": {"decode_cpus": 0.1}}
    )
    clean_env.setenv("GRANITE_BATCH_MAX_SEGMENT_S", "12")
    clean_env.setenv("GRANITE_BATCH_LANGUAGE", "de")
    clean_env.setenv("GRANITE_BATCH_RESOURCES__GPUS_PER_ACTOR", "0.5")
    clean_env.setenv("granite_batch_keywords", '["env", "word"]')  # case-insensitive; lists as JSON
    config = load_config(config_file, {"language": "es", "batch_size": None}, sets=["language=pt"], environment=True)
    assert config.batch_size == 1  # YAML over the default; an unset flag (None) changes nothing
    assert config.max_segment_s == 12  # environment over YAML
    assert config.language == "pt"  # --set over the flag over the environment over YAML
    assert config.resources.decode_cpus == 0.1 and config.resources.gpus_per_actor == 0.5  # nested layers merge
    assert config.keywords == ["env", "word"]
    # The environment is the CLI's layer: a Python caller gets it only by asking.
    assert load_config(config_file).max_segment_s == 11


def test_set_reaches_nested_fields_lists_mappings_and_null(clean_env):
    config = load_config(
        overrides=BASE,
        sets=[
            "resources.gpus_per_actor=0.5",
            "resources.actor_resources={speech_gpu: 1}",
            "subtitles=[srt, vtt]",
            "models=[{model: a}, {model: b, resources: {gpus_per_actor: 0.25}}]",
            "storage_options.s3.anon=true",
            "generation.max_new_tokens=64",
            "generation.max_new_tokens_per_audio_s=null",
            "run_id=nightly-1",
            "batch_size=8",
            "batch_size=16",  # the last word
        ],
    )
    assert config.resources.gpus_per_actor == 0.5 and config.resources.actor_resources == {"speech_gpu": 1.0}
    assert config.subtitles == ["srt", "vtt"]
    assert [spec.model for spec in config.model_specs()] == ["a", "b"]
    assert config.models[1].resources == {"gpus_per_actor": 0.25}
    assert config.storage_options == {"s3": {"anon": True}}
    assert config.generation.max_new_tokens == 64 and config.generation.max_new_tokens_per_audio_s is None
    assert config.run_id == "nightly-1" and config.batch_size == 16


@pytest.mark.parametrize(
    ("item", "named"),
    [
        ("resources.gpu_per_actor=1", "'gpu_per_actor' is not a field of resources"),
        ("generaton.num_beams=2", "'generaton' is not a field of the config"),
        ("models.0.model=x", "models is a list"),
        ("batch_size.x=1", "batch_size is a value"),
        ("batch_size", "give FIELD=VALUE"),
        ("keywords=[a", "not valid YAML"),
    ],
)
def test_a_bad_set_path_is_refused_naming_it(item, named):
    with pytest.raises(ConfigError, match=named) as caught:
        load_config(overrides=BASE, sets=[item])
    assert item.partition("=")[0] in str(caught.value)


def test_a_bad_set_exits_2_naming_the_path_before_any_work(tmp_path):
    result = run_cli(["run", "--manifest", "m.jsonl", "--output", str(tmp_path / "out"), "--set", "resources.gpu=1"])
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.startswith("granite-batch: --set resources.gpu: 'gpu' is not a field of resources")
    assert not (tmp_path / "out").exists()


def test_errors_name_the_file_line_variable_or_flag_that_gave_the_value(tmp_path, clean_env):
    config_file = tmp_path / "job.yaml"
    config_file.write_text("manifest: m.jsonl\noutput: out\n\nresources:\n  decode_cpus: 0.5\n  gpus_per_actor: -1\n")
    clean_env.setenv("GRANITE_BATCH_GENERATION__NUM_BEAMS", "zero")
    clean_env.setenv("GRANITE_BATCH_RESOURCES__GPUS_PER_ACTR", "1")  # misspelt: refused, not ignored
    with pytest.raises(ConfigError) as caught:
        load_config(config_file, {"language": "xx"}, sets=["batch_size=0"], environment=True)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"invalid job configuration ({config_file}, environment, command line):"
    found = {line.split(":")[0].strip(): line for line in lines[1:]}
    assert found["resources.gpus_per_actor"].endswith(f"({config_file} line 6)")
    assert found["generation.num_beams"].endswith("(environment GRANITE_BATCH_GENERATION__NUM_BEAMS)")
    assert found["resources.gpus_per_actr"].endswith("(environment GRANITE_BATCH_RESOURCES__GPUS_PER_ACTR)")
    assert found["language"].endswith("(command line)")
    assert found["batch_size"].endswith("(--set batch_size=0)")


def test_every_flag_of_run_sets_the_field_it_always_did(clean_env):
    argv = (
        "run --manifest m.jsonl --output out --max-new-tokens 7 --num-beams 2 --endpoint-url http://127.0.0.1:9 "
        "--anon --keywords 'Ray, Parquet,' --subtitles srt,vtt --allowed-prefixes /a/,/b/ --model-actors 2 "
        "--max-model-actors 3 --no-wait --no-lease --model a --model b --no-punctuation --task ast "
        "--language fr --target-language en --max-failed-fraction 0.25"
    )
    config = load_config(overrides=_overrides(_parser().parse_args(shlex.split(argv))))
    assert config.generation.max_new_tokens == 7 and config.generation.num_beams == 2
    assert config.storage_options == {"s3": {"endpoint_url": "http://127.0.0.1:9", "anon": True}}
    assert config.keywords == ["Ray", "Parquet"] and config.subtitles == ["srt", "vtt"]
    assert config.allowed_prefixes == ["/a/", "/b/"]
    assert (config.resources.model_actors_min, config.resources.model_actors_max) == (2, 3)
    assert config.lease == "none" and config.lease_wait_s == 0.0
    assert [spec.model for spec in config.model_specs()] == ["a", "b"]
    assert config.punctuation is False and (config.task, config.language, config.target_language) == ("ast", "fr", "en")
    assert config.max_failed_fraction == 0.25
    one = load_config(overrides=_overrides(_parser().parse_args(["run", "--model", "x", *shlex.split(argv)[1:5]])))
    assert one.model == "x" and one.models == []


def test_the_flag_table_names_real_fields_and_covers_every_flag():
    from granite_batch.layers import parse_set

    for path in FLAG_FIELDS.values():
        parse_set(f"{path}=null", JobConfig)  # raises on a path the config does not have
    run = next(a for a in _parser()._actions if a.dest == "command").choices["run"]
    dests = {action.dest for action in run._actions} - {"help"}
    # Flags that are not one config field each: handled by name in cli/run.py and cli/common.py.
    by_hand = {"config", "set", "model", "model_actors", "max_model_actors", "no_wait", "lease_wait_s", "no_lease"}
    by_hand |= {"no_progress", "verbose", "escalate_below", "escalate_on", "redo_model", "redo_where"}
    assert dests - by_hand == set(FLAG_FIELDS), "a flag of run sets no config field: add it to FLAG_FIELDS"


def test_config_show_prints_what_run_would_use_and_reads_back(tmp_path, clean_env):
    config_file = write_yaml(tmp_path, {**BASE, "language": "fr", "resources": {"decode_cpus": 0.25}})
    env = {"GRANITE_BATCH_RESOURCES__GPUS_PER_ACTOR": "0.5", "GRANITE_BATCH_KEYWORDS": '["Ray"]'}
    args = ["--config", str(config_file), "--batch-size", "4", "--set", "subtitles=[vtt]", "--endpoint-url", "http://h"]
    result = run_cli(["config", "show", *args], env=env)
    assert result.returncode == 0, result.stderr
    shown = tmp_path / "shown.yaml"
    shown.write_text(result.stdout)
    for name, value in env.items():
        clean_env.setenv(name, value)
    flags = {"batch_size": 4, "storage_options": {"s3": {"endpoint_url": "http://h"}}}
    expected = load_config(config_file, flags, sets=["subtitles=[vtt]"], environment=True)
    assert load_config(shown) == expected
    assert (expected.language, expected.resources.gpus_per_actor, expected.keywords) == ("fr", 0.5, ["Ray"])


def test_config_show_masks_secret_looking_storage_options(tmp_path):
    options = "storage_options.s3={key: AKIA-not-shown, secret: s3cr3t-not-shown, anon: false}"
    result = run_cli(["config", "show", "--manifest", "m.jsonl", "--output", "out", "--set", options])
    assert result.returncode == 0, result.stderr
    assert "not-shown" not in result.stdout
    assert yaml.safe_load(result.stdout)["storage_options"] == {"s3": {"key": "***", "secret": "***", "anon": False}}


def test_config_show_refuses_what_run_would_refuse(tmp_path):
    result = run_cli(["config", "show", "--manifest", "m.jsonl"])
    assert result.returncode == EXIT_CONFIG
    assert "output: Field required" in result.stderr


def test_config_schema_is_the_json_schema_of_the_job_config():
    result = run_cli(["config", "schema"])
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema == json.loads(json.dumps(JobConfig.model_json_schema()))
    assert schema["required"] == ["output"] and "gpus_per_actor" in schema["$defs"]["Resources"]["properties"]


def test_run_help_is_grouped_by_topic():
    result = run_cli(["run", "--help"])
    groups = [line[:-1] for line in result.stdout.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert groups[:1] == ["options"]
    expected = ["configuration", "input", "output", "models", "decoding", "resources", "storage", "lease", "misc"]
    assert groups[1:] == expected


def test_every_command_maps_what_stopped_it_to_the_same_exit_codes(capsys):
    from granite_batch.inputs.rows import ManifestError
    from granite_batch.models.hub import ModelLoadError
    from granite_batch.run.bookkeeping import TooManyFailures
    from granite_batch.run.lease import LeaseError, LeaseUnsupported

    cases = [
        (ConfigError("bad field"), EXIT_CONFIG, "granite-batch: bad field"),
        (LeaseUnsupported("no conditional writes"), EXIT_CONFIG, "granite-batch: no conditional writes"),
        (LeaseError("held by run R1"), EXIT_RUNTIME, "granite-batch: held by run R1"),
        (ManifestError("m.jsonl line 3: no audio"), EXIT_CONFIG, "granite-batch: bad manifest: m.jsonl line 3"),
        (ModelLoadError("cannot load model x"), EXIT_MODEL, "granite-batch: cannot load model x"),
        (TooManyFailures("3 of 4 rows failed"), EXIT_TOO_MANY_FAILURES, "granite-batch: 3 of 4 rows failed"),
        (RuntimeError("ray.exceptions.X\nModelLoadError: cannot load model y"), EXIT_MODEL, "granite-batch: cannot"),
        (OSError("bucket unreachable"), EXIT_RUNTIME, "granite-batch: job failed: OSError: bucket unreachable"),
    ]
    for exc, code, said in cases:
        assert exit_code(exc, "job") == code, exc
        assert capsys.readouterr().err.startswith(said), exc
    with pytest.raises(SystemExit):  # not a failure of the job: passed on
        exit_code(SystemExit(1), "job")
