"""Manifest reading: formats, defaults, stable ids, duplicates, and errors that name file/line/field."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLES, write_jsonl
from granite_batch.manifest import Defaults, ManifestError, default_id, read_manifest

DEFAULTS = Defaults(language="en", task="asr")


def rows_of(manifest):
    return manifest.table.to_pylist()


def test_sample_manifest_reads_with_defaults_and_resolved_paths():
    manifest = read_manifest(str(SAMPLES / "manifest.jsonl"), DEFAULTS)
    rows = rows_of(manifest)
    assert manifest.rows_in == 8 and manifest.duplicates == 0 and len(rows) == 8
    assert rows[0]["audio"] == str(SAMPLES / "en_weather.flac")  # relative to the manifest's folder
    assert [r["language"] for r in rows[:6]] == ["en", "fr", "de", "es", "pt", "ja"]
    assert rows[6]["task"] == "ast" and rows[6]["target_language"] == "en"
    assert rows[0]["task"] == "asr" and rows[0]["target_language"] is None
    assert rows[7]["keywords"] == ["breeze", "sunny"] and rows[0]["keywords"] == []
    assert all(r["error"] is None for r in rows)
    assert set(manifest.passthrough) == {"reference", "speaker"}


def test_ids_are_stable_and_depend_on_the_request(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"audio": "/a.wav"}, {"audio": "/a.wav", "task": "ast", "target_language": "fr"},
        {"audio": "/a.wav", "keywords": "x, y"}, {"audio": "/b.wav", "id": "given-id"},
    ])
    first = [r["id"] for r in rows_of(read_manifest(str(path), DEFAULTS))]
    again = [r["id"] for r in rows_of(read_manifest(str(path), DEFAULTS))]
    assert first == again and len(set(first)) == 4
    assert first[0] == default_id("/a.wav", "asr", None, [])
    assert first[2] == default_id("/a.wav", "asr", None, ["x", "y"])
    assert first[3] == "given-id"


def test_rows_sharing_an_id_are_one_unit_of_work(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"audio": "/a.wav", "note": "first"}, {"audio": "/b.wav"}, {"audio": "/a.wav", "note": "second"},
        {"audio": "/c.wav", "id": "k"}, {"audio": "/d.wav", "id": "k"},
    ])
    manifest = read_manifest(str(path), DEFAULTS)
    rows = rows_of(manifest)
    assert manifest.rows_in == 5 and manifest.duplicates == 2
    assert [r["audio"] for r in rows] == ["/a.wav", "/b.wav", "/c.wav"]
    assert rows[0]["note"] == "first"


def test_csv_with_quoted_commas_and_newlines(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('audio,language,keywords,reference\n'
                    '/a.wav,fr,"Lyon, Paris","line one\nline two, with comma"\n'
                    '/b.wav,,,\n', encoding="utf-8")
    rows = rows_of(read_manifest(str(path), DEFAULTS))
    assert rows[0]["keywords"] == ["Lyon", "Paris"] and rows[0]["language"] == "fr"
    assert rows[0]["reference"] == "line one\nline two, with comma"
    assert rows[1]["language"] == "en" and rows[1]["keywords"] == []


def test_parquet_and_folder_of_manifests(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"audio": ["/a.wav", "/b.wav"], "n": [1, 2]}), folder / "one.parquet")
    write_jsonl(folder / "two.jsonl", [{"audio": "/c.wav", "n": 3}])
    manifest = read_manifest(str(folder), DEFAULTS)
    assert [r["audio"] for r in rows_of(manifest)] == ["/a.wav", "/b.wav", "/c.wav"]
    assert [r["n"] for r in rows_of(manifest)] == [1, 2, 3]
    assert len(manifest.files) == 2


def test_keys_missing_from_the_first_line_are_still_read(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"audio": "/a.wav"}, {"audio": "/b.wav", "language": "de", "x": 1}])
    rows = rows_of(read_manifest(str(path), DEFAULTS))
    assert rows[1]["language"] == "de" and rows[1]["x"] == 1 and rows[0]["x"] is None


@pytest.mark.parametrize(
    "row, error",
    [
        ({"audio": "/a.wav", "language": "xx"}, "unsupported language: 'xx'"),
        ({"audio": "/a.wav", "task": "summarise"}, "unsupported task: 'summarise'"),
        ({"audio": "/a.wav", "task": "ast"}, "missing target_language"),
        ({"audio": "/a.wav", "language": "fr", "task": "ast", "target_language": "de"},
         "unsupported translation pair: fr -> de"),
    ],
)
def test_bad_values_become_error_rows(tmp_path, row, error):
    path = write_jsonl(tmp_path / "m.jsonl", [row, {"audio": "/ok.wav"}])
    rows = rows_of(read_manifest(str(path), DEFAULTS))
    assert rows[0]["error"].startswith(error)
    assert rows[1]["error"] is None


def test_unsupported_language_lands_in_the_undetermined_partition(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"audio": "/a.wav", "language": "../../etc"}])
    row = rows_of(read_manifest(str(path), DEFAULTS))[0]
    assert row["language"] == "und" and "../../etc" in row["error"]


def test_job_defaults_fill_empty_columns(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"audio": "/a.wav"}, {"audio": "/b.wav", "keywords": ["own"]}])
    defaults = Defaults(language="es", task="ast", target_language="en", keywords=("Madrid",))
    rows = rows_of(read_manifest(str(path), defaults))
    assert (rows[0]["language"], rows[0]["task"], rows[0]["target_language"]) == ("es", "ast", "en")
    assert rows[0]["keywords"] == ["Madrid"] and rows[1]["keywords"] == ["own"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"audio": "/a.wav"}\n{"audio": "/b.wav"\n', r"m\.jsonl line 2: malformed JSON"),
        ('{"audio": "/a.wav"}\n["/b.wav"]\n', r"m\.jsonl line 2: each line must be a JSON object"),
        ('{"audio": "/a.wav"}\n\n{"language": "en"}\n', r"m\.jsonl line 3: field 'audio' is missing or empty"),
        ('{"path": "/a.wav"}\n', r"m\.jsonl: missing required column 'audio'"),
        ('{"audio": "/a.wav", "text": "x"}\n', r"m\.jsonl: column 'text' is reserved"),
        ('{"audio": "/a.wav", "n": 1}\n{"audio": "/b.wav", "n": "two"}\n',
         r"m\.jsonl: line 2: field 'n' is str, but line 1 has float"),
        ('{"audio": "/a.wav", "keywords": 5}\n', r"field 'keywords' must be a list of strings"),
    ],
)
def test_schema_errors_name_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "m.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ManifestError, match=message):
        read_manifest(str(path), DEFAULTS)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"audio": "/a.wav"}\n{"audio": "/\xff.wav"}\n')
    with pytest.raises(ManifestError, match=r"line 2: not valid UTF-8"):
        read_manifest(str(path), DEFAULTS)


def test_csv_row_with_too_many_fields_names_the_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("audio,language\n/a.wav,en\n/b.wav,en,extra\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"m\.csv line 3: 3 fields, the header has 2"):
        read_manifest(str(path), DEFAULTS)


def test_missing_manifest_and_unknown_format(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(str(tmp_path / "nope.jsonl"), DEFAULTS)
    (tmp_path / "m.txt").write_text("audio\n")
    with pytest.raises(ManifestError, match="unknown manifest format"):
        read_manifest(str(tmp_path / "m.txt"), DEFAULTS)
