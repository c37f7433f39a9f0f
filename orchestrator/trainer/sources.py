"""Where the base model and data come from: ``s3://`` (downloaded once into a cache, verified
against the upload's manifest), ``file://`` / ``pvc://`` (read in place) and ``hf://``
(Hugging Face Hub, only where one is reachable).

Failures name the URI. A missing object or denied access is permanent (``ModelError`` /
``DataError``, with the reason StorageNotFound / StorageAccessDenied); a server that is down,
throttling or timing out, or a full workspace volume, is ``StorageFailure`` (74, retried):
see ``errors.storage_failure``. Reachability is
probed first with a single short attempt so an unreachable endpoint fails in seconds
instead of after the long retry budget a multi-GB download deserves.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orchestrator import storage
from orchestrator.storage.checksum import MANIFEST_NAME, Manifest, build_manifest, iter_files
from orchestrator.trainer.errors import DataError, ModelError, disk_fault_in, storage_failure

log = logging.getLogger("orchestrator.trainer")

PROBE = storage.S3Config(max_attempts=1, connect_timeout=3.0, read_timeout=10.0)
MODEL_FILES = ("config.json",)


def probe(uri: str) -> None:
    """Raise a StorageError now if nothing is at ``uri`` (fast: one attempt for S3)."""
    u = storage.parse_uri(uri)
    if u.is_local:
        local, key = storage.open_store(u)
        if not local.path(key).exists():  # type: ignore[attr-defined]
            raise storage.ObjectNotFoundError(f"nothing found at {uri}", uri)
        return
    store, key = storage.open_store(u, s3=PROBE)
    if not store.list(key) and not store.exists(key):
        raise storage.ObjectNotFoundError(f"nothing found at {uri}", uri)


def resolve_model(uri: str, cache_dir: Path | None = None) -> Path:
    """A local directory holding the model (config.json, weights, tokenizer)."""
    try:
        if uri.startswith("hf://"):
            path = _from_hub(uri[len("hf://"):])
        else:
            probe(uri)
            path = storage.fetch(uri, cache_dir=cache_dir)
    except ModelError:
        raise
    except (storage.StorageError, OSError) as exc:
        if isinstance(exc, OSError) and not disk_fault_in(exc):
            raise
        raise storage_failure(exc, f"base model {uri} is unavailable", "spec.model.uri",
                              ModelError) from None
    if not path.is_dir() or not all((path / f).is_file() for f in MODEL_FILES):
        raise ModelError(f"base model {uri} is not a Hugging Face model directory (no "
                         f"config.json in {path})")
    return path


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        raise ModelError("hf:// model URIs need huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id, etag_timeout=5))
    except Exception as exc:  # offline mode, DNS, 401/404: all mean "not available here"
        hint = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ModelError(f"cannot fetch hf://{repo_id} from the Hugging Face Hub{hint}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                         "Copy the model to s3:// or a PVC and point model.uri there") from None


def resolve_data(uri: str, cache_dir: Path | None = None) -> Path:
    try:
        probe(uri)
        return storage.fetch(uri, cache_dir=cache_dir)
    except (storage.StorageError, OSError) as exc:
        if isinstance(exc, OSError) and not disk_fault_in(exc):
            raise
        raise storage_failure(exc, f"cannot read data {uri}", "spec.data",
                              lambda m: DataError(m)) from None


def model_digest(path: Path) -> str:
    """sha256 identifying the base model: the digest of its kubetune manifest when the model
    came with one (uploads made by kubetune), else of a manifest built here (hashes every file,
    in parallel; run it off the critical path for big models)."""
    manifest_file = path / MANIFEST_NAME
    if manifest_file.is_file():
        return Manifest.from_bytes(manifest_file.read_bytes()).digest
    with ThreadPoolExecutor(max_workers=4) as pool:
        manifest = build_manifest(iter_files(path), hasher=pool)
    # The digest of the canonical manifest without its timestamp: stable across runs.
    manifest.created_at = ""
    return manifest.digest
