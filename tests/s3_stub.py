"""A tiny S3 endpoint that answers every request with one error (503 SlowDown by default),
counting the requests: the real HTTP path through botocore's retries, for tests of what a
user sees when the object store is overloaded or down."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class ErrorServer:
    endpoint: str
    status: int
    code: str
    requests: list[str] = field(default_factory=list)


@contextmanager
def error_server(status: int = 503, code: str = "SlowDown",
                 message: str = "Please reduce your request rate.") -> Iterator[ErrorServer]:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>stub</RequestId></Error>").encode()
    lock = threading.Lock()
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            with lock:
                seen.append(f"{self.command} {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            """Quiet: the tests read `seen` instead."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ErrorServer(f"http://127.0.0.1:{server.server_address[1]}", status, code, seen)
    finally:
        server.shutdown()
        server.server_close()
