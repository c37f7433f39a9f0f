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

import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orchestrator import storage
from orchestrator.storage.checksum import MANIFEST_NAME, Manifest, build_manifest, iter_files
from orchestrator.trainer.errors import DataError, ModelError, disk_fault_in, storage_failure

log = logging.getLogger("orchestrator.trainer")

PROBE = storage.S3Config(max_attempts=1, connect_timeout=3.0, read_timeout=10.0)
MODEL_FILES = ("config.json",)
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")  # what data.read_records reads
DEFAULT_SPLIT = "train"
_HF_DATA = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(@(?P<rev>[^:@\s]+))?(:(?P<split>[\w.-]+))?$")


def probe(uri: str) -> None:
    """Raise a StorageError now if nothing is at ``uri`` (fast: one attempt for S3)."""
    u = storage.parse_uri(uri)
    if u.is_local:
        local, key = storage.open_store(u)
        if not local.path(key).exists():  # type: ignore[attr-defined]
            raise storage.ObjectNotFoundError(f"nothing found at {uri}", uri)
        return
    store, key = storage.open_store(u, s3=PROBE)
    if not store.has_objects(key) and not store.exists(key):
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
    if uri.startswith("hf://"):
        return hub_dataset(uri, cache_dir or storage.default_cache_dir())
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


# --- hf:// datasets ---------------------------------------------------------------------------


def parse_hub_dataset(uri: str) -> tuple[str, str | None, str | None]:
    """``hf://<org>/<name>[@<revision>][:<split>]`` -> (repo id, revision, split)."""
    m = _HF_DATA.match(uri)
    if m is None:
        raise DataError(f"{uri} is not a Hugging Face dataset URI: use "
                        "hf://<org>/<name>[@<revision>][:<split>], e.g. "
                        "hf://org/support-chats@v1.0:train")
    return m["repo"], m["rev"], m["split"]


def split_files(files: Iterable[str], split: str | None) -> list[str]:
    """The data files of ``split`` among a dataset repository's files (paths relative to the
    repository), by the Hub's file-naming convention: a directory or file name that is the
    split's name or holds it between separators (``train.jsonl``, ``data/train-00000-of-00002
    .parquet``, ``default/train/0000.parquet``, ``support_test.jsonl``). Without a split:
    the ``train`` files, or every data file when no name says train."""
    data = sorted(f for f in files if f.endswith(DATA_SUFFIXES) and not any(
        part.startswith(".") for part in f.split("/")))

    def of(name: str) -> list[str]:
        word = re.compile(rf"(.*[-._ ])?{re.escape(name)}([-._ 0-9].*)?", re.IGNORECASE)
        return [f for f in data
                if any(word.fullmatch(part) for part in f.rsplit(".", 1)[0].split("/"))]

    if split is not None:
        return of(split)
    return of(DEFAULT_SPLIT) or data


def _split_name(path: str) -> str:
    """The split a data file's name suggests: its leading word (``train-00000-of-00002``), or
    its directory's for numbered files (``default/validation/0000.parquet``)."""
    parts = path.rsplit(".", 1)[0].split("/")
    for part in reversed(parts):
        word = re.split(r"[-._ 0-9]", part)[0]
        if word:
            return word
    return ""


def hub_dataset(uri: str, cache_dir: Path) -> Path:
    """A local directory holding exactly the data files of an ``hf://`` dataset's split
    (links into the Hub cache, HF_HOME): the reader then treats it like any data prefix."""
    repo, revision, split = parse_hub_dataset(uri)
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        raise DataError("hf:// data URIs need huggingface_hub") from None
    patterns = [f"*{suffix}" for suffix in DATA_SUFFIXES]
    if not constants.HF_HUB_OFFLINE:
        try:  # fetch only the split's files when the Hub answers
            listed = HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)
            patterns = split_files(listed, split) or patterns
        except Exception as exc:  # snapshot_download below says what is wrong
            log.debug("listing hf://%s failed: %s", repo, exc)
    try:
        snap = Path(snapshot_download(repo, repo_type="dataset", revision=revision,
                                      allow_patterns=patterns, etag_timeout=5))
    except Exception as exc:  # offline, DNS, 401/404, unknown revision: "not available here"
        hint = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"cannot fetch dataset {uri} from the Hugging Face Hub{hint}: "
                        f"{type(exc).__name__}: {first}. Copy the data to s3:// or a PVC and "
                        "point the data URI there") from None
    present = [p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()]
    chosen = split_files(present, split)
    if not chosen:
        names = sorted({_split_name(f) for f in present if f.endswith(DATA_SUFFIXES)} - {""})
        raise DataError(f"dataset {uri} has no data files (.parquet, .jsonl) for split "
                        f"{split or DEFAULT_SPLIT!r}; its files suggest: "
                        f"{', '.join(names[:10]) or 'none'}")
    key = hashlib.sha256("\n".join([str(snap), *chosen]).encode()).hexdigest()[:16]
    out = cache_dir / "hf-data" / key
    if not out.is_dir():  # built aside and renamed: ranks sharing the cache never see half
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".building-"))
        for rel in chosen:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).symlink_to((snap / rel).resolve())
        try:
            tmp.rename(out)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("dataset %s: %d file(s) of revision %s", uri, len(chosen), snap.name)
    return out
