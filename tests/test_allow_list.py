"""`allowed_prefixes` over http(s): the URL checked is the URL fetched, at every redirect, and an
allow-list that names nothing allows nothing."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import SPEECH, run_cli, write_jsonl
from granite_batch.audio.decode import DecodeError, load_recording
from granite_batch.inputs.manifest import read_manifest
from granite_batch.inputs.rows import Defaults
from granite_batch.storage import NotCanonical, canonical_url, is_allowed, probe_url
from web_server import WebServer


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A server whose /files/ holds podcasts/a.flac (allowed) and private/x.flac (not)."""
    root = tmp_path_factory.mktemp("web")
    for folder, name in (("podcasts", "a.flac"), ("private", "x.flac")):
        (root / folder).mkdir()
        shutil.copy(SPEECH, root / folder / name)
    server = WebServer(root)
    yield server
    server.close()


def _allowed(web) -> tuple[str, ...]:
    return (f"{web.url}/files/podcasts/",)


def test_the_test_server_resolves_encoded_dot_segments_as_real_servers_do(web):
    # What makes the escape real: the server (like nginx) serves /private/ for this URL.
    url, size = probe_url(f"{web.url}/files/podcasts/%2e%2e/private/x.flac")
    assert size == SPEECH.stat().st_size


@pytest.mark.parametrize(
    "tail",
    [
        "%2e%2e/private/x.flac",
        "%2E%2E/private/x.flac",
        ".%2e/private/x.flac",
        "a/%2e%2e/%2e%2e/private/x.flac",
        "..%2fprivate/x.flac",
        "%252e%252e/private/x.flac",
        "..;/private/x.flac",
    ],
)
def test_encoded_dot_segments_do_not_leave_the_allowed_prefix(web, tail):
    url = f"{web.url}/files/podcasts/{tail}"
    assert not is_allowed(url, _allowed(web))
    before = len(web.requests)
    with pytest.raises(DecodeError, match="^not allowed: "):
        load_recording(url, allowed_prefixes=_allowed(web))
    assert not any("private" in r or "%2" in r.lower() for r in web.requests[before:]), web.requests[before:]


def test_a_redirect_to_an_encoded_escape_is_refused_before_it_is_followed(web):
    web.redirects["/files/podcasts/moved.flac"] = "/files/podcasts/%2e%2e/private/x.flac"
    web.redirects["/files/podcasts/relative.flac"] = "%2e%2e/private/x.flac"
    for name in ("moved.flac", "relative.flac"):
        before = len(web.requests)
        with pytest.raises(DecodeError, match=f"^not allowed: .*{name} redirects to .*outside the allowed prefixes"):
            load_recording(f"{web.url}/files/podcasts/{name}", allowed_prefixes=_allowed(web))
        assert web.requests[before:] == [f"HEAD /files/podcasts/{name}"]


def test_a_redirect_inside_the_prefix_is_followed_in_its_canonical_form(web):
    web.redirects["/files/podcasts/inside.flac"] = "/files/podcasts/x/%2e%2e/./a.flac"
    before = len(web.requests)
    recording = load_recording(f"{web.url}/files/podcasts/inside.flac", allowed_prefixes=_allowed(web))
    assert recording.duration_s > 3.0
    assert web.requests[before + 1 :][0] == "HEAD /files/podcasts/a.flac"
    assert all(r.endswith("/files/podcasts/a.flac") for r in web.requests[before + 1 :])


def test_an_escaping_url_in_a_manifest_is_an_error_row(web, tmp_path):
    rows = [
        {"id": "ok", "audio": f"{web.url}/files/podcasts/a.flac"},
        {"id": "escape", "audio": f"{web.url}/files/podcasts/%2e%2e/private/x.flac"},
    ]
    table = read_manifest(str(write_jsonl(tmp_path / "m.jsonl", rows)), Defaults(allowed_prefixes=_allowed(web)))
    errors = dict(zip(table.table.column("id").to_pylist(), table.table.column("error").to_pylist()))
    assert errors["ok"] is None
    assert errors["escape"].startswith("not allowed:")


def test_canonical_urls():
    assert canonical_url("HTTP://Media.Example.ORG:80/a/./b/../c%20d.wav?x=1#f") == (
        "http://media.example.org/a/c%20d.wav?x=1"
    )
    assert canonical_url("https://h:8443/a//b/%2e%2e/c.wav") == "https://h:8443/a/c.wav"
    assert canonical_url("https://h/p/%C3%BC%25.wav") == "https://h/p/%C3%BC%25.wav"
    for url in (
        "https://h/a/..%2Fb",
        "https://h/a/%5c..%5cb",
        "https://h/a\\..\\b",
        "https://h/a/%252e%252e/b",
        "https://h/a/%ff.wav",
        "https://h/a/%0a.wav",
        "https://h:99999/a.wav",
        "https://good.example@evil.example/a.wav",
        "https:///a.wav",
    ):
        with pytest.raises(NotCanonical):
            canonical_url(url)
        assert not is_allowed(url, ("https://h/", "https://good.example/"))


@pytest.mark.parametrize("prefixes", [("",), (" ",), ("", " "), (" , ",)])
def test_an_allow_list_of_blanks_allows_nothing(tmp_path, prefixes):
    assert not is_allowed(str(tmp_path / "a.wav"), prefixes)
    assert not is_allowed(os.path.join(os.getcwd(), "a.wav"), prefixes)  # "" once read as the current folder
    assert not is_allowed("https://h/a.wav", prefixes)
    assert not is_allowed("s3://bucket/a.wav", prefixes)
    assert is_allowed(str(tmp_path / "a.wav"), (*prefixes, str(tmp_path)))  # blanks beside a prefix are ignored


@pytest.mark.parametrize("value", [" , ", ",", " ", ""])
def test_an_allowed_prefixes_flag_that_names_nothing_is_a_usage_error(tmp_path, value):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"audio": str(SPEECH)}])
    result = run_cli(
        ["run", "--manifest", str(manifest), "--output", str(tmp_path / "out"), "--allowed-prefixes", value]
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--allowed-prefixes" in result.stderr and "names no prefix" in result.stderr
    assert not (tmp_path / "out").exists()
