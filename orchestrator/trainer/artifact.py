"""The trainer's outputs: artifact metadata (``kubetune.json``), the upload with retries and
the termination message the controller reads.

Termination message (JSON, at most 4 KiB; Kubernetes truncates longer ones): written to
``$KUBETUNE_TERMINATION_LOG`` or, in a pod, ``/dev/termination-log``::

    {"format": "kubetune.trainer/v1", "status": "Succeeded" | "Failed" | "Pruned",
     "exitCode": 0, "reason": "Succeeded", "message": "...",
     "metrics": {"evalLoss": ..., "trainLoss": ..., "generalLossDelta": ...,
                 "trainableParams": ..., "totalParams": ..., "trainableParamPercent": ...,
                 "rank": ..., "runtimeSeconds": ...},
     "progress": {"step": 120, "totalSteps": 900},
     "artifact": {"uri": "s3://.../job/", "sha256": "<manifest digest>"},
     "budget": {"targetPercent": 1.0, "withinTolerance": true, "note": ""}}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator import storage
from orchestrator.trainer.errors import REASONS, ExitCode, storage_failure

log = logging.getLogger("orchestrator.trainer")

TERMINATION_ENV = "KUBETUNE_TERMINATION_LOG"
POD_TERMINATION_LOG = "/dev/termination-log"
MAX_TERMINATION_BYTES = 4096
METADATA_NAME = "kubetune.json"
TRAINER_FORMAT = "kubetune.trainer/v1"
METADATA_FORMAT = "kubetune.artifact/v1"


def termination_path() -> Path | None:
    if env := os.environ.get(TERMINATION_ENV):
        return Path(env)
    # Only inside a container: the kubelet creates the file. Never create files under /dev.
    p = Path(POD_TERMINATION_LOG)
    return p if p.exists() else None


def _encode(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), default=str, ensure_ascii=False).encode()


def _clip_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, never inside a character."""
    return text.encode()[: max(0, max_bytes)].decode("utf-8", errors="ignore")


def termination_message(code: ExitCode, message: str = "", *, reason: str | None = None,
                        **parts: Any) -> bytes:
    """The JSON document, always valid and at most 4 KiB: the free text is shortened first,
    then the least important parts are dropped; the exit code, reason and artifact stay.
    ``reason`` defaults to the exit code's (storage failures name their fault instead)."""
    status = {ExitCode.OK: "Succeeded", ExitCode.PRUNED: "Pruned",
              ExitCode.STOPPED: "Stopped"}.get(code, "Failed")
    doc: dict[str, Any] = {"format": TRAINER_FORMAT, "status": status, "exitCode": int(code),
                           "reason": reason or REASONS[code], "message": message}
    doc.update({k: v for k, v in parts.items() if v is not None})
    raw = _encode(doc)
    if len(raw) > MAX_TERMINATION_BYTES:
        over = len(raw) - MAX_TERMINATION_BYTES
        doc["message"] = _clip_utf8(message, len(message.encode()) - over - 8) + "…"
        raw = _encode(doc)
    for key in ("budget", "progress", "metrics"):
        if len(raw) <= MAX_TERMINATION_BYTES:
            break
        doc.pop(key, None)
        raw = _encode(doc)
    if len(raw) > MAX_TERMINATION_BYTES:  # only an absurd artifact URI gets here
        doc = {k: doc[k] for k in ("format", "status", "exitCode", "reason")}
        doc["message"] = _clip_utf8(message, 1024)
        raw = _encode(doc)
    return raw


def write_termination(code: ExitCode, message: str = "", *, reason: str | None = None,
                      **parts: Any) -> None:
    """Written by each pod's local rank 0 only: one writer per file, never two processes
    truncating each other's message."""
    path = termination_path()
    if path is None or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    try:
        path.write_bytes(termination_message(code, message, reason=reason, **parts))
    except OSError as exc:  # never let reporting mask the real outcome
        log.warning("cannot write termination message to %s: %s", path, exc)


def spec_fingerprint(spec: Any) -> str:
    """sha256 of the spec fields that determine the training result (not resources,
    scheduling or credentials): checkpoints and artifacts are only reused when it matches."""
    wire = spec.model_dump(mode="json", by_alias=True)
    keep = {k: wire.get(k) for k in ("model", "data", "method", "training", "distributed")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("kubetune", "torch", "transformers", "peft", "accelerate", "deepspeed",
                 "safetensors", "bitsandbytes"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def write_metadata(out_dir: Path, doc: Mapping[str, Any]) -> Path:
    path = out_dir / METADATA_NAME
    path.write_text(json.dumps({"format": METADATA_FORMAT, **doc}, indent=2, sort_keys=True,
                               default=str) + "\n")
    return path


def upload_with_retries(local_dir: Path, uri: str, *, attempts: int = 4,
                        backoff: float = 2.0, what: str = "artifact") -> storage.Manifest:
    """upload_dir with whole-upload retries on top of the store's per-file retries. A
    missing bucket or denied access fails at once (OutputError, 73: permanent); anything
    else is retried and raises StorageFailure (74: the controller retries the attempt) when
    every attempt failed (see errors.storage_failure)."""
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            return storage.upload_dir(local_dir, uri, progress=False)
        except (storage.StorageError, OSError) as exc:
            last = exc
            if storage.fault_of(exc) in storage.PERMANENT_FAULTS:
                raise storage_failure(exc, f"{what} upload to {uri} failed",
                                      "spec.output.uri") from None
            if attempt < attempts:
                delay = backoff * 2 ** (attempt - 1)
                log.warning("%s upload to %s failed (%s); retry %d/%d in %.0fs", what, uri, exc,
                            attempt, attempts - 1, delay)
                time.sleep(delay)
    assert last is not None
    raise storage_failure(last, f"{what} upload to {uri} failed after {attempts} attempts",
                          "spec.output.uri")


def read_metadata(uri: str) -> dict[str, Any] | None:
    """The kubetune.json of a complete upload at ``uri`` (manifest present), else None.

    A missing bucket or denied access raises OutputError (73) now, before any training:
    the upload at the end would fail the same way. Other failures read as "not there"."""
    try:
        if not storage.exists(uri.rstrip("/") + "/" + storage.MANIFEST_NAME):
            return None
        doc = json.loads(storage.read_text(uri.rstrip("/") + "/" + METADATA_NAME))
        return doc if isinstance(doc, dict) else None
    except storage.StorageError as exc:
        if exc.permanent and not isinstance(exc, storage.ObjectNotFoundError):
            raise storage_failure(exc, f"cannot use the output location {uri}",
                                  "spec.output.uri") from None
        return None
    except ValueError:
        return None
