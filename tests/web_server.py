"""A small HTTP server on 127.0.0.1 for the tests: files with Range support, and failures on purpose."""

from __future__ import annotations

import http.server
import posixpath
import threading
import urllib.parse
from pathlib import Path


class WebServer:
    """Serves `root` under `/files/`; `/missing/...` answers 404, `/forbidden/...` 403, `/drop/...`
    closes the connection without an answer, `/flaky/<name>` does so on the first request of each
    kind and then serves the file, `/cut/<name>` ends every answer halfway through its body,
    `/moved/<name>` redirects to `/files/<name>`, and `/away/<name>` redirects to the same file under
    another host name (`localhost`); `redirects` maps a raw request path to a Location of choice.
    Like nginx, a path is percent-decoded and its `.`/`..` segments resolved before it is served."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        self.seen: set[str] = set()
        self.redirects: dict[str, str] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                """Quiet: tests read what was asked from `requests`, not from stderr."""

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                server.requests.append(f"{self.command} {self.path}")
                if self.path in server.redirects:
                    return self._status(302, {"Location": server.redirects[self.path]})
                path = posixpath.normpath(urllib.parse.unquote(self.path.split("?", 1)[0]))
                kind, _, name = path.lstrip("/").partition("/")
                first_time = self.path not in server.seen
                server.seen.add(self.path)
                if kind == "drop" or (kind == "flaky" and first_time):
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if kind in ("moved", "away"):
                    host = "localhost" if kind == "away" else "127.0.0.1"
                    return self._status(302, {"Location": f"http://{host}:{server.port}/files/{name}"})
                path = server.root / name
                if kind == "forbidden":
                    return self._status(403)
                if kind not in ("files", "flaky", "cut") or not path.is_file():
                    return self._status(404)
                data = path.read_bytes()
                start, end = 0, len(data) - 1
                ranged = self.headers.get("Range", "").startswith("bytes=")
                if ranged:
                    first, _, last = self.headers["Range"][6:].partition("-")
                    start, end = int(first or 0), min(int(last) if last else len(data) - 1, len(data) - 1)
                self.send_response(206 if ranged else 200)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if body and kind == "cut":  # the connection ends halfway through the answer
                    self.wfile.write(data[start : start + (end - start + 1) // 2])
                    self.close_connection = True
                    self.connection.shutdown(2)
                elif body:
                    self.wfile.write(data[start : end + 1])

            def _status(self, code: int, headers: dict | None = None):
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
