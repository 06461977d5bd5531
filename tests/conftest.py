"""Shared fixtures: the tiny checkpoint, real recordings in many formats, broken files, a CLI runner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import av
import numpy as np
import pytest

# Ray fixes its authentication mode once per process (RayConfig), at the first Ray call, whichever
# test makes it. Ray enables token auth for a new local cluster anyway; saying so for the whole session
# keeps the state API (test_faults, test_ray_job_submit) sending the token whatever ran first.
os.environ.setdefault("RAY_AUTH_MODE", "token")
import soundfile as sf

# Tests never touch the network; the Hub client answers "not cached" at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
SPEECH = SAMPLES / "en_weather.flac"  # a real espeak-ng recording, 22.05 kHz mono


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Granite Speech checkpoint written by the same command users run."""
    directory = tmp_path_factory.mktemp("tiny-model")
    result = run_cli(["tiny-model", str(directory)])
    assert result.returncode == 0, result.stderr
    return directory


def _tiny_checkpoint(tmp_path_factory, model_type: str) -> Path:
    directory = tmp_path_factory.mktemp(f"tiny-{model_type}")
    result = run_cli(["tiny-model", str(directory), "--model-type", model_type])
    assert result.returncode == 0, result.stderr
    return directory


@pytest.fixture(scope="session")
def tiny_plus_dir(tmp_path_factory) -> Path:
    """A tiny random granite_speech_plus (4.1-2b-plus architecture) checkpoint, written by the CLI."""
    return _tiny_checkpoint(tmp_path_factory, "granite_speech_plus")


@pytest.fixture(scope="session")
def tiny_ctc_dir(tmp_path_factory) -> Path:
    """A tiny random granite_speech5_ctc (5.0 TurboCTC architecture) checkpoint, written by the CLI."""
    return _tiny_checkpoint(tmp_path_factory, "granite_speech5_ctc")


@pytest.fixture(scope="session")
def speech() -> tuple[np.ndarray, int]:
    samples, rate = sf.read(SPEECH, dtype="float32")
    return samples, rate


def encode(
    path: Path,
    samples: np.ndarray,
    rate: int,
    codec: str,
    container: str,
    channels: int = 1,
    out_rate: int | None = None,
    with_video: bool = False,
) -> Path:
    """Encode float samples (mono, or duplicated to `channels`) into a real container with PyAV."""
    out_rate = out_rate or rate
    layout = {1: "mono", 2: "stereo", 6: "5.1"}[channels]
    planar = np.repeat(samples.reshape(1, -1), channels, axis=0).astype(np.float32)
    if channels > 1:
        planar[1:] *= 0.5  # distinct channels, so a wrong downmix shows up in the level
    with av.open(str(path), "w", format=container) as out:
        video = add_video_stream(out) if with_video else None
        stream = out.add_stream(codec, rate=out_rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=out_rate)
        for converted in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(converted):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
        if video is not None:
            write_video_frames(out, video, frames=int(len(samples) / rate * 10))
    return path


def add_video_stream(out):
    """A small 10 fps MPEG-4 video stream in container `out`."""
    video = out.add_stream("mpeg4", rate=10)
    video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
    return video


def write_video_frames(out, video, frames: int) -> None:
    for i in range(frames):
        image = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i % 255, np.uint8), format="rgb24")
        image.pts = i
        for packet in video.encode(image):
            out.mux(packet)
    for packet in video.encode(None):
        out.mux(packet)


# name -> (codec, container, channels, output rate, with video)
FORMATS = {
    "speech.wav": ("pcm_s16le", "wav", 2, 44100, False),
    "speech.flac": ("flac", "flac", 1, None, False),
    "speech.mp3": ("mp3", "mp3", 2, 44100, False),
    "speech.opus.ogg": ("libopus", "ogg", 1, 48000, False),
    "speech.m4a": ("aac", "mp4", 2, 44100, False),
    "speech.mp4": ("aac", "mp4", 1, 22050, True),
}


@pytest.fixture(scope="session")
def format_corpus(tmp_path_factory, speech) -> dict[str, Path]:
    """The same real speech in every container/codec the contract names (video included)."""
    directory = tmp_path_factory.mktemp("formats")
    samples, rate = speech
    return {
        name: encode(directory / name, samples, rate, codec, container, channels, out_rate, video)
        for name, (codec, container, channels, out_rate, video) in FORMATS.items()
    }


@pytest.fixture(scope="session")
def broken_corpus(tmp_path_factory, speech) -> dict[str, Path]:
    """Recordings that cannot be transcribed, each for its own reason."""
    directory = tmp_path_factory.mktemp("broken")
    samples, rate = speech
    files = {
        "empty.wav": directory / "empty.wav",
        "random.mp3": directory / "random.mp3",
        "text.wav": directory / "text.wav",
        "no_audio.mp4": directory / "no_audio.mp4",
        "missing.flac": directory / "missing.flac",
    }
    files["empty.wav"].write_bytes(b"")
    files["random.mp3"].write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    files["text.wav"].write_text("this is not audio, just text with a .wav name\n" * 20)
    with av.open(str(files["no_audio.mp4"]), "w", format="mp4") as out:
        write_video_frames(out, add_video_stream(out), frames=10)
    return files


def ffmpeg_decode(path: Path, rate: int = 16000) -> np.ndarray:
    """The reference decoder: the ffmpeg command-line tool, downmixed and resampled by ffmpeg."""
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-vn", "-ac", "1", "-ar", str(rate), "-f", "f32le", "-"],
        check=True,
        capture_output=True,
    ).stdout
    return np.frombuffer(raw, dtype="<f4")


def run_cli(args: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `granite-batch` as users do, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "granite_batch.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# --- object storage: a real S3 API server (moto's server mode) on loopback ------------------------

FAKE_SECRET = "granite-batch-fake-secret-Zx81Qv"  # must never appear in outputs or logs
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "granite-batch-test-key",
    "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A live S3 API on 127.0.0.1; yields its endpoint URL. Credentials come from the environment."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {key: os.environ.get(key) for key in S3_ENV}
    os.environ.update(S3_ENV)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def atomic_s3_server(s3_server):
    """The same S3 data (moto's backends are per process) behind an endpoint that handles one request
    at a time. moto 5.2.5's put_object checks `If-None-Match: *` and then stores the object with no lock
    between (read in its source; no double win seen in 40 trials of 16 concurrent PUTs), while S3
    evaluates the condition atomically: tests that race conditional writes use this endpoint."""
    import threading

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def one_at_a_time(environ, start_response):
        with lock:
            return list(app(environ, start_response))

    server = make_server("127.0.0.1", free_port(), one_at_a_time, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture
def s3(s3_server):
    """An s3fs client on the server, for arranging inputs and reading outputs."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    return fs


class FaultyProxy:
    """An HTTP proxy in front of the S3 server that fails every `every`-th request.

    Failures alternate between an HTTP 503 SlowDown answer and a connection closed without any
    answer, the two transient faults object stores really produce. Headers named in `strip_headers`
    never reach the server (a store that ignores them, e.g. `If-None-Match`).
    """

    def __init__(self, upstream: str, every: int = 5, strip_headers: tuple[str, ...] = ()):
        import http.server
        import threading
        import urllib.parse

        self.upstream = urllib.parse.urlparse(upstream)
        self.every = every
        self.strip_headers = {name.lower() for name in strip_headers} | {"host"}
        self.count = 0
        self.faults = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                import http.client

                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy._lock:
                    proxy.count += 1
                    fault = proxy.count % proxy.every == 0
                    if fault:
                        proxy.faults += 1
                    kind = proxy.faults % 2
                if fault and kind == 0:
                    self.close_connection = True  # drop: no status line at all
                    self.connection.shutdown(2)
                    return
                if fault:
                    payload = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message></Error>"
                    )
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy.strip_headers}
                headers["Host"] = proxy.upstream.netloc
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # A HEAD answer carries the object's length with no body: pass it through.
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --- a Ray cluster started the way operators start one ------------------------------------------

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_cluster(request):
    """`ray start --head` with the dashboard (job submission) on 127.0.0.1, in its own temp dir.

    Parametrise indirectly with {"head_cpus": n} to size the head node.
    """
    head_cpus = getattr(request, "param", {}).get("head_cpus", 2)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay short
    port, dashboard = free_port(), free_port()
    # The CLI sends the dashboard token only when asked. PATH: on this one-machine "cluster" the
    # virtualenv plays the role of the image, so the job's `python` must be the virtualenv's.
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "PATH": f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    # --block keeps the head in one process group that this fixture alone ends (`ray stop` would
    # end every Ray on the machine, other test runs' included).
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={head_cpus}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            # The agents' own ports too: their defaults (52365 and others) are taken by any other Ray on
            # the machine, such as the one this test session started, and a head whose job agent cannot
            # listen answers every submission with "No available agent to submit job".
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        _wait_for_dashboard(f"http://127.0.0.1:{dashboard}", head)
        yield {"address": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{port}", "env": env, "temp_dir": temp_dir}
    finally:
        os.killpg(head.pid, 9)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout_s: float = 120) -> None:
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # answering (with an auth error): it is up
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the Ray dashboard at {url} did not come up")
