"""HTTP endpoint where trial pods report intermediate eval values (POST /report).

Why our own small endpoint rather than Optuna's GrpcStorageProxy: a storage proxy would give
every trial pod write access to every study; here a pod can only add values to its own
trial (HMAC token bound to sweep uid and trial number), and the answer carries the pruning
decision, so the trainer learns "stop" in the same round trip.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from orchestrator.sweep import bearer_token

log = logging.getLogger("kubetune.report")
MAX_BODY = 64 * 1024


def serve(reconciler: Any, port: int, controller: Any = None) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("report %s", fmt % args)

        def _answer(self, code: int, doc: dict[str, Any]) -> None:
            raw = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._answer(200, {"ok": True})
            else:
                self._answer(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/report":
                self._answer(404, {"error": "not found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                self._answer(400, {"error": "body required (JSON, at most 64 KiB)"})
                return
            try:
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                self._answer(400, {"error": f"invalid JSON: {exc}"})
                return
            try:
                code, doc = reconciler.handle_report(
                    body, bearer_token(self.headers.get("Authorization"))
                )
            except Exception as exc:
                log.exception("report failed")
                self._answer(500, {"error": str(exc)})
                return
            self._answer(code, doc)
            if controller is not None and code == 200 and doc.get("action") == "prune":
                # let the sweep launch the next trial right away
                threading.Thread(
                    target=controller._safe,
                    args=(
                        controller.reconcile_job,
                        {"metadata": {"namespace": body["namespace"], "name": body["job"]}},
                    ),
                    daemon=True,
                ).start()

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="report-server", daemon=True).start()
    log.info("intermediate-metric endpoint listening on :%d/report", port)
    return server
