"""Manifest reading: formats, defaults, stable ids, duplicates, and errors that name file/line/field."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLES, write_jsonl
from granite_batch.inputs.manifest import read_manifest
from granite_batch.inputs.rows import Defaults, ManifestError, default_id

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
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"audio": "/a.wav"},
            {"audio": "/a.wav", "task": "ast", "target_language": "fr"},
            {"audio": "/a.wav", "keywords": "x, y"},
            {"audio": "/b.wav", "id": "given-id"},
        ],
    )
    first = [r["id"] for r in rows_of(read_manifest(str(path), DEFAULTS))]
    again = [r["id"] for r in rows_of(read_manifest(str(path), DEFAULTS))]
    assert first == again and len(set(first)) == 4
    assert first[0] == default_id("/a.wav", "asr", None, [])
    assert first[2] == default_id("/a.wav", "asr", None, ["x", "y"])
    assert first[3] == "given-id"


def test_rows_sharing_an_id_are_one_unit_of_work(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"audio": "/a.wav", "note": "first"},
            {"audio": "/b.wav"},
            {"audio": "/a.wav", "note": "second"},
            {"audio": "/c.wav", "id": "k"},
            {"audio": "/d.wav", "id": "k"},
        ],
    )
    manifest = read_manifest(str(path), DEFAULTS)
    rows = rows_of(manifest)
    assert manifest.rows_in == 5 and manifest.duplicates == 2
    assert [r["audio"] for r in rows] == ["/a.wav", "/b.wav", "/c.wav"]
    assert rows[0]["note"] == "first"


def test_csv_with_quoted_commas_and_newlines(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(
        'audio,language,keywords,reference\n/a.wav,fr,"Lyon, Paris","line one\nline two, with comma"\n/b.wav,,,\n',
        encoding="utf-8",
    )
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
        (
            {"audio": "/a.wav", "language": "fr", "task": "ast", "target_language": "de"},
            "unsupported translation pair: fr -> de",
        ),
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
        (
            '{"audio": "/a.wav", "n": 1}\n{"audio": "/b.wav", "n": "two"}\n',
            r"m\.jsonl: line 2: field 'n' is str, but line 1 has int",
        ),
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


# --- every allowed form, in blocks ----------------------------------------------------------------

from granite_batch.inputs.manifest import ManifestStream
from granite_batch.inputs.rows import first_of_each_id

MIXED_ROWS = [  # each contract column in every allowed form, varying from row to row
    {"audio": "/r/0.wav", "id": 7, "keywords": ["Lyon", " Paris "], "note": "a"},
    {"audio": "/r/1.wav", "id": "k-1", "keywords": "Lyon, Paris", "note": None},
    {"audio": "/r/2.wav", "id": None, "keywords": None},
    {"audio": "/r/3.wav", "keywords": "", "language": "FR"},
    {"audio": "/r/4.wav", "id": "  ", "keywords": [], "task": "AST", "target_language": "EN", "language": "fr"},
    {"audio": "/r/5.wav", "id": 12, "keywords": "solo"},
]
UNIFORM_ROWS = [  # the same requests, each column in one form
    {"audio": "/r/0.wav", "id": "7", "keywords": ["Lyon", "Paris"], "note": "a"},
    {"audio": "/r/1.wav", "id": "k-1", "keywords": ["Lyon", "Paris"], "note": None},
    {"audio": "/r/2.wav", "id": None, "keywords": None},
    {"audio": "/r/3.wav", "id": None, "keywords": [], "language": "fr"},
    {"audio": "/r/4.wav", "id": None, "keywords": [], "task": "ast", "target_language": "en", "language": "fr"},
    {"audio": "/r/5.wav", "id": "12", "keywords": ["solo"]},
]


def mixed_csv(path):
    path.write_text(
        "audio,id,keywords,language,task,target_language,note\n"
        '/r/0.wav,7,"Lyon, Paris ",,,,a\n'
        '/r/1.wav,k-1,"Lyon,Paris",,,,\n'
        "/r/2.wav,,,,,,\n"
        "/r/3.wav,,,FR,,,\n"
        "/r/4.wav,  ,,fr,AST,EN,\n"
        "/r/5.wav,12,solo,,,,\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("block_bytes", [1 << 20, 90])  # one block, and a block every line or two
def test_mixed_forms_in_jsonl_and_csv_give_the_rows_of_uniform_forms(tmp_path, block_bytes):
    uniform = read_manifest(str(write_jsonl(tmp_path / "uniform.jsonl", UNIFORM_ROWS)), DEFAULTS)
    expected = rows_of(uniform)
    assert [r["keywords"] for r in expected] == [["Lyon", "Paris"], ["Lyon", "Paris"], [], [], [], ["solo"]]
    assert expected[0]["id"] == "7" and expected[5]["id"] == "12" and expected[4]["task"] == "ast"

    jsonl = write_jsonl(tmp_path / "mixed.jsonl", MIXED_ROWS)
    csv_path = mixed_csv(tmp_path / "mixed.csv")
    pq.write_table(pa.Table.from_struct_array(pa.array(UNIFORM_ROWS)), tmp_path / "uniform.parquet")
    for source in (jsonl, csv_path, tmp_path / "uniform.parquet"):
        stream = ManifestStream(str(source), DEFAULTS, block_bytes=block_bytes)
        table = pa.concat_tables(list(stream), promote_options="permissive")
        rows = table.to_pylist()
        assert [{k: r[k] for k in r if k != "note"} for r in rows] == [
            {k: r[k] for k in r if k != "note"} for r in expected
        ], source.name
        assert [r["note"] for r in rows] == ["a", None, None, None, None, None]
        assert stream.rows_in == 6 and stream.ids_replaced == 3


def test_empty_blank_and_null_ids_are_replaced_by_the_digest_and_counted(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"audio": "/a.wav", "id": ""},
            {"audio": "/b.wav", "id": "  "},
            {"audio": "/c.wav", "id": None},
            {"audio": "/d.wav", "id": "d"},
            {"audio": "/e.wav"},
        ],
    )
    manifest = read_manifest(str(path), DEFAULTS)
    assert manifest.ids_replaced == 4  # the missing key in a manifest that has the column counts too
    assert [r["id"] for r in rows_of(manifest)][:3] == [default_id(f"/{c}.wav", "asr", None, []) for c in "abc"]
    assert read_manifest(str(write_jsonl(tmp_path / "n.jsonl", [{"audio": "/a.wav"}])), DEFAULTS).ids_replaced == 0


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"audio": "/a.wav", "n": 1}', '{"audio": "/b.wav"}', '{"audio": "/c.wav", "n": "two"}'],
            r"m\.jsonl: line 3: field 'n' is str, but line 1 has int",
        ),
        (
            ['{"audio": "/a.wav", "meta": {"a": 1}}', '{"audio": "/b.wav", "meta": 2}'],
            r"m\.jsonl: line 2: field 'meta' is int, but line 1 has dict",
        ),
        (
            ['{"audio": "/a.wav", "meta": {"a": {"b": 1}}}', '{"audio": "/b.wav", "meta": {"a": 2}}'],
            r"m\.jsonl: line 2: field 'meta' is struct<a: int64>, but line 1 has struct<a: struct<b: int64>>",
        ),
        (
            ['{"audio": "/a.wav"}', '{"audio": "/b.wav", "keywords": 5}'],
            r"m\.jsonl line 2: field 'keywords' must be a list of strings or one comma-separated string, not int",
        ),
        (
            ['{"audio": "/a.wav"}', '{"audio": "/b.wav", "keywords": ["x", 3]}'],
            r"m\.jsonl line 2: field 'keywords' must be a list of strings .*not a list holding int",
        ),
        (['{"audio": "/a.wav", "id": 1.5}'], r"m\.jsonl line 1: field 'id' must be a string or an integer"),
        (
            ['{"audio": "/a.wav", "x": []}', '{"audio": "/b.wav", "x": [false, 0]}'],
            r"m\.jsonl: line 2: field 'x' is a list whose items cannot share one type",
        ),
    ],
)
@pytest.mark.parametrize("block_bytes", [1 << 20, 40])
def test_type_clashes_and_keyword_errors_name_column_and_lines_in_any_block(tmp_path, lines, message, block_bytes):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=message):
        list(ManifestStream(str(path), DEFAULTS, block_bytes=block_bytes))


def test_malformed_line_far_into_a_big_manifest_names_its_line(tmp_path):
    rows = [f'{{"audio": "/r/{i}.wav", "id": "r{i}"}}' for i in range(3000)]
    rows[2500] = '{"audio": "/r/2500.wav", "id": '
    rows.insert(10, "")  # a blank line still counts as a line
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"m\.jsonl line 2502: malformed JSON"):
        list(ManifestStream(str(path), DEFAULTS, block_bytes=4096))
    rows[2501] = '{"id": "no audio"}'
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"m\.jsonl line 2502: field 'audio' is missing or empty"):
        list(ManifestStream(str(path), DEFAULTS, block_bytes=4096))


def test_csv_in_many_blocks_reads_as_one_file_and_names_bad_lines(tmp_path):
    lines = ["audio,n,reference"] + [f'/r/{i}.wav,{i},"said ""{i}"",\nthen"' for i in range(2000)]
    lines[1500] = '/r/1499.wav,many,"x"'  # a word in a number column, far from the first block
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    whole = read_manifest(str(path), DEFAULTS).table
    streamed = pa.concat_tables(list(ManifestStream(str(path), DEFAULTS, block_bytes=4096)))
    assert whole.schema.field("n").type == pa.string() == streamed.schema.field("n").type
    assert streamed.to_pylist() == whole.to_pylist() and streamed.num_rows == 2000
    assert streamed.column("reference")[0].as_py() == 'said "0",\nthen'

    lines[1800] = "/r/x.wav,1,2,3"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # The header, 1799 rows of two lines but one of one line before it: data row 1799 is line 3599.
    with pytest.raises(ManifestError, match=r"m\.csv line 3599: 4 fields, the header has 3"):
        list(ManifestStream(str(path), DEFAULTS, block_bytes=4096))


def test_parquet_keyword_type_error_names_the_row(tmp_path):
    pq.write_table(pa.table({"audio": ["/a.wav", "/b.wav"], "keywords": [None, [1, 2]]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"m\.parquet row 2: field 'keywords' must be a list of strings"):
        read_manifest(str(tmp_path / "m.parquet"), DEFAULTS)


def test_passthrough_types_unify_across_blocks_and_files(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"audio": "/a.wav", "n": 1, "meta": {"x": 1}}, {"audio": "/b.wav"}])
    write_jsonl(folder / "b.jsonl", [{"audio": "/c.wav", "n": 2.5, "meta": {"y": "z"}, "day": "2026-12-01"}])
    manifest = read_manifest(str(folder), DEFAULTS)
    assert manifest.table.schema.field("n").type == pa.float64()
    assert [r["meta"] for r in rows_of(manifest)] == [{"x": 1, "y": None}, None, {"x": None, "y": "z"}]
    assert rows_of(manifest)[2]["day"] == "2026-12-01"  # a date stays the text it was
    write_jsonl(folder / "c.jsonl", [{"audio": "/d.wav", "n": "three"}])
    with pytest.raises(ManifestError, match=r"c\.jsonl: line 1: field 'n' is str, but .*a\.jsonl line 1 has float"):
        read_manifest(str(folder), DEFAULTS)


def test_first_of_each_id_keeps_manifest_order():
    table = pa.table({"id": ["b", "a", "b", "c", "a"], "n": [0, 1, 2, 3, 4]})
    assert first_of_each_id(table).to_pylist() == [{"id": "b", "n": 0}, {"id": "a", "n": 1}, {"id": "c", "n": 3}]


def test_lists_of_nulls_pass_through_and_meet_other_blocks(tmp_path):
    # pyarrow 26 reads [null, null] into an invalid list<null> array and casts one wrongly.
    path = write_jsonl(tmp_path / "m.jsonl", [{"audio": "/a.wav", "x": [None, None]}, {"audio": "/b.wav", "x": ["y"]}])
    for block_bytes in (1 << 20, 30):
        table = (
            read_manifest(str(path), DEFAULTS).table
            if block_bytes > 30
            else pa.concat_tables(
                list(ManifestStream(str(path), DEFAULTS, block_bytes=block_bytes)), promote_options="permissive"
            )
        )
        assert table.column("x").to_pylist() == [[None, None], ["y"]]


HF_AUDIO = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def test_embedded_recordings_that_share_a_path_but_differ_get_their_own_ids(tmp_path):
    a, b = (SAMPLES / "en_weather.flac").read_bytes(), (SAMPLES / "fr_gare.mp3").read_bytes()
    audio = [{"bytes": a, "path": "clip.wav"}, {"bytes": b, "path": "clip.wav"}, {"bytes": a, "path": "clip.wav"}]
    pq.write_table(pa.table({"audio": pa.array(audio, HF_AUDIO)}), tmp_path / "m.parquet")
    manifest = read_manifest(str(tmp_path / "m.parquet"), Defaults())
    rows = rows_of(manifest)
    assert len(rows) == 2 and rows[0]["id"] != rows[1]["id"]  # two recordings, two ids
    assert [r["audio_bytes"] for r in rows] == [a, b]
    assert manifest.duplicates == 1 and manifest.duplicates_differing == 0  # the third is the first again


def test_a_duplicate_id_naming_another_recording_is_warned_and_counted(tmp_path, caplog):
    rows = [
        {"id": "x", "audio": "/a.wav"},
        {"id": " x", "audio": "/a.wav"},  # ids are stripped: the same id, the same recording
        {"id": "x ", "audio": "/b.wav"},  # the same id, another recording
    ]
    with caplog.at_level("WARNING"):
        manifest = read_manifest(str(write_jsonl(tmp_path / "m.jsonl", rows)), Defaults())
    assert [r["id"] for r in rows_of(manifest)] == ["x"]
    assert manifest.duplicates == 2 and manifest.duplicates_differing == 1
    assert "1 row(s) repeat an id with another recording" in caplog.text


@pytest.mark.parametrize(
    ("column", "message"),
    [
        ("language_detected", "'language_detected' is reserved for the output"),
        ("Text", "'Text' differs from the job's column 'text' only in case"),
        ("ERROR", "'ERROR' differs from the job's column 'error'"),
        ("Language", "'Language' differs from the job's column 'language'"),
        ("id ", "'id ' differs from the job's column 'id'"),
        ("", "a column has an empty name ''"),
        ("  ", "a column has an empty name '  '"),
    ],
)
def test_a_column_the_output_would_shadow_is_refused_naming_it(tmp_path, column, message):
    path = write_jsonl(tmp_path / "m.jsonl", [{"audio": "/a.wav", column: "x"}])
    with pytest.raises(ManifestError, match=re.escape(message)):
        read_manifest(str(path), Defaults())
    pq.write_table(pa.table({"audio": ["/a.wav"], column: ["x"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=re.escape(message)):
        read_manifest(str(tmp_path / "m.parquet"), Defaults())


def test_an_output_root_inside_the_manifest_folder_is_not_read_as_manifests(tmp_path):
    # What a run leaves under OUTPUT when OUTPUT lies inside the manifest folder: its lease, its
    # summary, its committed files and a second pass's; none of them is a manifest.
    folder = tmp_path / "nightly"
    (folder / "out" / "_leases" / "transcripts").mkdir(parents=True)
    (folder / "out" / "_leases" / "transcripts" / "00000001.json").write_text('{"holder": "x"}\n')
    (folder / "out" / "runs").mkdir()
    (folder / "out" / "runs" / "r1.json").write_text('{"run_id": "r1"}\n')
    (folder / "out" / "transcripts" / "language=en").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"]}), folder / "out" / "transcripts" / "language=en" / "part-r1-00000.parquet")
    (folder / "out" / "second_pass" / "qa" / "_runs").mkdir(parents=True)
    (folder / "out" / "second_pass" / "qa" / "_runs" / "s1.json").write_text('{"run_id": "s1"}\n')
    write_jsonl(folder / "monday.jsonl", [{"audio": "/a.wav"}])
    write_jsonl(folder / "out" / "extra.jsonl", [{"audio": "/b.wav"}])  # the user's own file stays a manifest
    manifest = read_manifest(str(folder), DEFAULTS)
    assert [r["audio"] for r in rows_of(manifest)] == ["/a.wav", "/b.wav"]
    assert len(manifest.files) == 2


def test_a_dictionary_encoded_language_column_is_read_as_text(tmp_path):
    path = tmp_path / "m.parquet"
    languages = pa.array(["en", "fr", "en"]).dictionary_encode()
    pq.write_table(pa.table({"audio": ["/a.wav", "/b.wav", "/c.wav"], "language": languages}), path)
    assert [r["language"] for r in rows_of(read_manifest(str(path), DEFAULTS))] == ["en", "fr", "en"]


@pytest.mark.parametrize("block_bytes", [40, 1 << 20])
def test_a_per_row_flag_that_is_no_boolean_is_that_rows_error_not_a_refused_manifest(tmp_path, block_bytes):
    from granite_batch.inference.routing import RequestFlags, row_requests
    from granite_batch.schema import conform

    rows = [
        {"audio": "/a.wav", "speakers": True},
        {"audio": "/b.wav", "speakers": "maybe"},
        {"audio": "/c.wav", "speakers": False, "word_timestamps": 1},
        {"audio": "/d.wav", "speakers": "true"},
    ]
    stream = ManifestStream(str(write_jsonl(tmp_path / "m.jsonl", rows)), DEFAULTS, block_bytes=block_bytes)
    blocks = list(stream)  # the stream's schema is known once every block is read, as plan.py conforms them
    table = first_of_each_id(pa.concat_tables([conform(block, stream.schema) for block in blocks]))
    requests, _, errors = row_requests(table, RequestFlags())
    assert errors == [None, "invalid speakers: 'maybe' (use true or false)", None, None]
    assert [r.speakers for r in requests] == [True, False, False, True]
    assert requests[2].word_times is True  # 1 reads as true, as in CSV
