"""S3-compatible object store on boto3.

Path-style addressing and "checksum only when required" keep it working against
S3-compatible servers (SeaweedFS, moto, Ceph RGW) as well as AWS. On a 2-core pod the
client's CPU is the limit, so the data path keeps bytes out of Python:

- uploads are multipart uploads through one s3transfer manager per store, shared by every
  file of a directory, with 64 MiB parts and a 2 MiB read buffer;
- downloads are parallel ranged GETs (``get_object(...)["Body"].read()`` fills one buffer
  per range in C), each written with one ``pwrite`` and hashed in file order while still in
  memory (transfer.py), and resumable. 8 MiB ranges stay below glibc's mmap threshold, so
  their buffers are recycled instead of being faulted in afresh; obstore's Rust client was
  measured too and spent more CPU per GiB here (bench/storage_throughput.py, issue 16).

botocore retries individual requests and we retry whole files on transient failures; an
interrupted download resumes from the ranges it already has.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from orchestrator.storage import s5cmd
from orchestrator.storage.base import Callback, ObjectInfo, ObjectStore, Todo, partial_path
from orchestrator.storage.checksum import RESERVED_NAMES, TEMP_PREFIX
from orchestrator.storage.errors import (
    BucketNotFoundError,
    CredentialsError,
    EndpointUnreachableError,
    Fault,
    LocalDiskError,
    ObjectNotFoundError,
    StorageError,
    StorageUnavailableError,
    local_fault,
    s3_code_fault,
)
from orchestrator.storage.transfer import (
    Budget,
    Fetch,
    TransferStats,
    journal_path,
    ranged_download,
)
from orchestrator.storage.uri import StorageURI

ENDPOINT_ENVS = ("KUBETUNE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_ENVS = ("KUBETUNE_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION")
MiB = 1 << 20
log = logging.getLogger("orchestrator.storage")

_CRED_HINT = (
    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (in a cluster: the Secret named by "
    "spec.storage.credentialsSecret) and that they may use this bucket"
)
#: botocore transport failures, by class name (s3.py alone imports botocore): all are
#: UNAVAILABLE. The connect failures are retried by botocore only (a whole-operation retry
#: would multiply the connect timeouts); the rest also by the store, which restarts a
#: transfer that broke mid-way.
_CONNECT_ERRORS = ("EndpointConnectionError", "ConnectTimeoutError", "ProxyConnectionError")
_TRANSPORT_ERRORS = (
    *_CONNECT_ERRORS,
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "HTTPClientError",
    "ConnectionError",  # botocore's base of the connect errors (and the builtin one)
)
RETRY_MODES = ("standard", "adaptive", "legacy")
CHECKSUM_MODES = ("when_supported", "when_required")


@dataclass
class S3Config:
    """Connection settings. Anything left None is taken from the environment: endpoint from
    KUBETUNE_S3_ENDPOINT / AWS_ENDPOINT_URL(_S3), region from AWS_REGION /
    AWS_DEFAULT_REGION, credentials through boto3's standard chain (AWS_ACCESS_KEY_ID, ...)."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    # never in a repr: configs end up in logs and tracebacks
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    # botocore retries every request itself (5xx, throttling, timeouts, resets) up to
    # max_attempts times with exponential backoff; "adaptive" also slows the client down
    # when the server throttles (SlowDown). Bounded, so a dead server fails the attempt in
    # about a minute instead of hanging. Env: KUBETUNE_S3_MAX_ATTEMPTS, KUBETUNE_S3_RETRY_MODE.
    max_attempts: int | None = None  # per request, the first try included; default 5
    retry_mode: str | None = None  # standard | adaptive (default standard)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # S3's own integrity checksums: "when_supported" (default) sends a CRC32 with every
    # upload, so the server refuses a body corrupted on the way, and checks the one it
    # returns with a whole-object GET; "when_required" only where an API demands one, for
    # S3-compatible servers that reject them. Env: KUBETUNE_S3_CHECKSUMS. Our sha256
    # manifest stays the end-to-end check either way.
    checksums: str | None = None
    # Measured on 2 cores against SeaweedFS (bench/storage_throughput.py): big parts and a
    # few requests in flight per file beat many small ones; memory per file stays below
    # 2 x part size x concurrency.
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 64 * MiB  # upload part size
    max_concurrency: int = 4  # parallel upload parts within one file
    io_chunksize: int = 2 * MiB  # read buffer of uploads (s3transfer's default is 256 KiB)
    download_part_size: int = 8 * MiB  # ranged GET size (below glibc's 32 MiB mmap limit)
    download_concurrency: int = 8  # ranged GETs in flight within one file
    file_workers: int = 16  # files of a directory moved at once (memory: see above)
    # Download engine: "python" (the ranged GETs of transfer.py) or "s5cmd" (s5cmd moves
    # the bytes, kubetune verifies; see s5cmd.py). Env: KUBETUNE_S3_ENGINE; the trainer
    # image sets s5cmd. Without the binary the Python path is used, with a warning.
    engine: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # passed to botocore Config

    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or _first_env(ENDPOINT_ENVS)

    def resolved_region(self) -> str:
        return self.region or _first_env(REGION_ENVS) or "us-east-1"

    def resolved_retries(self) -> dict[str, Any]:
        """botocore's ``retries`` setting: a bounded attempt count and the retry mode."""
        attempts = self.max_attempts or int(os.environ.get("KUBETUNE_S3_MAX_ATTEMPTS") or 5)
        mode = self.retry_mode or os.environ.get("KUBETUNE_S3_RETRY_MODE") or "standard"
        if mode not in RETRY_MODES:
            raise ValueError(f"S3 retry mode must be one of {', '.join(RETRY_MODES)}, not {mode!r}")
        # total_max_attempts counts the first try too (botocore's max_attempts does not).
        return {"total_max_attempts": max(1, attempts), "mode": mode}

    def resolved_checksums(self) -> Literal["when_supported", "when_required"]:
        value = self.checksums or os.environ.get("KUBETUNE_S3_CHECKSUMS") or "when_supported"
        if value not in CHECKSUM_MODES:
            raise ValueError(
                f"KUBETUNE_S3_CHECKSUMS / S3Config.checksums: {value!r} is not one of "
                f"{', '.join(CHECKSUM_MODES)}"
            )
        return "when_supported" if value == "when_supported" else "when_required"


def _first_env(names: tuple[str, ...]) -> str | None:
    for name in names:
        if value := os.environ.get(name):
            return value
    return None


class S3Store(ObjectStore):
    def __init__(
        self,
        bucket: str,
        config: S3Config | None = None,
        *,
        client: Any = None,
        progress: bool | None = None,
        workers: int | None = None,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        self.config = config or S3Config()
        super().__init__(
            progress=progress,
            workers=workers or self.config.file_workers,
            retries=retries,
            backoff=backoff,
        )
        self.bucket = bucket
        self.endpoint_url = self.config.resolved_endpoint()
        self.client = client or self._make_client()
        from boto3.s3.transfer import TransferConfig

        cfg = self.config
        self.transfer_config = TransferConfig(
            multipart_threshold=cfg.multipart_threshold,
            multipart_chunksize=cfg.multipart_chunksize,
            max_concurrency=cfg.max_concurrency,
            io_chunksize=cfg.io_chunksize,
            use_threads=True,
        )
        self.stats = TransferStats()
        # One memory budget for every file this store fetches at once.
        self.budget = Budget(2 * max(1, cfg.download_concurrency), self.stats)
        self._lock = threading.Lock()
        self._warned_no_s5cmd = False
        s5cmd.resolve_engine(self.config.engine)  # a wrong value fails here, not mid-download
        self._uploader: Any = None  # one s3transfer TransferManager for every upload

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        cfg = self.config
        session = boto3.session.Session(
            aws_access_key_id=cfg.access_key_id,
            aws_secret_access_key=cfg.secret_access_key,
            aws_session_token=cfg.session_token,
            region_name=cfg.resolved_region(),
        )
        botocore_cfg = Config(
            s3={"addressing_style": "path"},
            retries=cfg.resolved_retries(),  # type: ignore[arg-type]
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
            # Room for every file worker's parallel parts, so none waits for a connection.
            max_pool_connections=max(
                10, self.workers + max(cfg.max_concurrency, 2 * cfg.download_concurrency) + 2
            ),
            request_checksum_calculation=cfg.resolved_checksums(),
            response_checksum_validation=cfg.resolved_checksums(),
            **cfg.extra,
        )
        return session.client("s3", endpoint_url=self.endpoint_url, config=botocore_cfg)

    def uri(self, key: str = "") -> str:
        return str(StorageURI("s3", self.bucket, key.strip("/")))

    # ---- primitives -------------------------------------------------------------------
    def head(self, key: str) -> ObjectInfo:
        key = key.strip("/")

        def call() -> ObjectInfo:
            r = self.client.head_object(Bucket=self.bucket, Key=key)
            meta = {k.lower(): v for k, v in (r.get("Metadata") or {}).items()}
            return ObjectInfo(
                key,
                int(r["ContentLength"]),
                str(r.get("ETag", "")).strip('"'),
                meta.get("sha256"),
                meta.get("xxh3"),
                meta.get("xxh3t"),
            )

        return self._retrying(call, key, "head")

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        p = prefix.strip("/")

        def call() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{p}/" if p else ""
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/"):
                        continue  # "folder" placeholder objects some tools create
                    out.append(
                        ObjectInfo(
                            obj["Key"], int(obj["Size"]), str(obj.get("ETag", "")).strip('"')
                        )
                    )
            return sorted(out, key=lambda o: o.key)

        return self._retrying(call, p, "list")

    def has_objects(self, prefix: str) -> bool:
        p = prefix.strip("/")

        def call() -> bool:
            # pages of a few keys: the first real object ends it (a dataset of 50,000 shards
            # is one request, not 50 pages)
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{p}/" if p else "", PaginationConfig={"PageSize": 8}
            )
            return any(not obj["Key"].endswith("/")
                       for page in pages for obj in page.get("Contents", []))

        return self._retrying(call, p, "list")

    def read_bytes(self, key: str) -> bytes:
        key = key.strip("/")

        def call() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        return self._retrying(call, key, "read")

    def write_bytes(self, key: str, data: bytes) -> None:
        key = key.strip("/")
        # A single PUT is atomic on S3: readers see the old or the new object.
        self._retrying(
            lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data), key, "write"
        )

    def delete_prefix(self, prefix: str) -> int:
        p = prefix.strip("/")
        if not p:
            raise StorageError(f"refusing to delete the whole bucket {self.uri()}", self.uri())
        keys = [o.key for o in self.list(p)]
        if self.exists(p):
            keys.append(p)
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch: dict[str, Any] = {
                "Objects": [{"Key": k} for k in keys[i : i + 1000]],
                "Quiet": True,
            }
            r: dict[str, Any] = self._retrying(partial(self._delete_batch, batch), p, "delete")
            if errors := r.get("Errors"):
                first = errors[0]
                raise StorageError(
                    f"could not delete {self.uri(first.get('Key', p))}: {first.get('Code')} "
                    f"{first.get('Message', '')}".strip(),
                    self.uri(p),
                )
        return len(keys)

    def _delete_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        return dict(self.client.delete_objects(Bucket=self.bucket, Delete=batch))

    def _put_file(
        self, local: Path, key: str, callback: Callback, digests: dict[str, str]
    ) -> None:
        extra = {"Metadata": dict(digests)} if digests else {}
        future = self._transfer_manager().upload(
            str(local),
            self.bucket,
            key.strip("/"),
            extra_args=extra,
            subscribers=[_Progress(callback)],
        )
        future.result()

    def _transfer_manager(self) -> Any:
        """One TransferManager for the store: every file of a directory shares its threads
        and connections instead of starting its own (boto3's upload_file makes one per
        call)."""
        with self._lock:
            if self._uploader is None:
                from s3transfer.manager import TransferManager

                self._uploader = TransferManager(self.client, self.transfer_config)
            return self._uploader

    def close(self) -> None:
        with self._lock:
            if self._uploader is not None:
                self._uploader.shutdown()
                self._uploader = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    # Downloads: s5cmd when enabled (s5cmd.py), else (and for whatever it could not fetch)
    # ranged GETs hashed while written (transfer.py), resumable.
    resumable = True

    def _bulk_download(
        self, todo: Todo, out: Path, advance: Callback, prefix: str | None = None
    ) -> Todo:
        settings = self._s5cmd_settings()
        if settings is None:
            return todo
        items = [
            s5cmd.Item(info.key.strip("/"), info.size, info.check, out / rel, rel)
            for rel, info in todo
            if s5cmd.eligible(info.key)
        ]
        whole = None
        if prefix is not None and len(items) == len(todo) > 1:
            whole = self._whole_prefix(prefix.strip("/"))
        left = s5cmd.download(items, out, settings, advance, _forget_partial, whole)
        delivered = {item.key for item in items} - {item.key for item in left}
        return [(rel, info) for rel, info in todo if info.key.strip("/") not in delivered]

    @staticmethod
    def _whole_prefix(prefix: str) -> s5cmd.WholePrefix:
        """Copy ``prefix/*`` in one go, leaving out what a download never wants: the
        manifest and checksums, temp objects of an upload in flight."""
        temp = f"{TEMP_PREFIX}*"
        return s5cmd.WholePrefix(prefix, (*sorted(RESERVED_NAMES), temp, f"*/{temp}"))

    def _s5cmd_settings(self) -> s5cmd.Settings | None:
        cfg = self.config
        if s5cmd.resolve_engine(cfg.engine) != "s5cmd":
            return None
        binary = s5cmd.find_binary()
        if binary is None:
            if not self._warned_no_s5cmd:
                self._warned_no_s5cmd = True
                log.warning(
                    "%s=s5cmd but no s5cmd binary (set %s or put s5cmd on PATH): downloads "
                    "use the Python client", s5cmd.ENGINE_ENV, s5cmd.BINARY_ENV,
                )
            return None
        env = {"AWS_REGION": cfg.resolved_region()}
        if cfg.access_key_id and cfg.secret_access_key:
            env.update(AWS_ACCESS_KEY_ID=cfg.access_key_id,
                       AWS_SECRET_ACCESS_KEY=cfg.secret_access_key)
            # not a token from the environment that belongs to other keys
            env["AWS_SESSION_TOKEN"] = cfg.session_token or ""
        return s5cmd.Settings(
            binary=binary,
            bucket=self.bucket,
            endpoint=self.endpoint_url,
            env=env,
            part_size_mib=max(1, cfg.multipart_chunksize // MiB),
            concurrency=cfg.max_concurrency,
            # Go goroutines writing straight into their files, not Python threads holding
            # buffers: many more files in flight cost little (s5cmd's own default is 256).
            workers=max(s5cmd.FILE_WORKERS, cfg.file_workers),
        )

    def _download_to(
        self, info: ObjectInfo, tmp: Path, callback: Callback, algorithm: str | None
    ) -> str | None:
        key = info.key.strip("/")
        cfg = self.config
        return ranged_download(
            self._fetcher(key, info.size),
            info.size,
            tmp,
            part_size=cfg.download_part_size,
            concurrency=cfg.download_concurrency,
            callback=callback,
            algorithm=algorithm,
            identity={"key": key, "size": info.size, "sha256": info.sha256, "etag": info.etag},
            stats=self.stats,
            budget=self.budget,
            what=self.uri(key),
        )

    def _get_file(self, key: str, dest: Path, callback: Callback, size: int) -> None:
        info = ObjectInfo(key, size)
        self._download_to(info, dest, callback, None)

    def _fetcher(self, key: str, size: int | None = None) -> Fetch:
        """fetch(start, end) -> bytes [start, end) of the object, one GET each; the whole
        object (``size`` bytes) is asked for without a Range header, which some servers
        (SeaweedFS among them) serve on a faster path."""

        def fetch(start: int, end: int) -> bytes:
            extra = {} if start == 0 and end == size else {"Range": f"bytes={start}-{end - 1}"}
            body = self.client.get_object(Bucket=self.bucket, Key=key, **extra)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        return fetch

    # ---- errors -----------------------------------------------------------------------
    def _is_transient(self, exc: BaseException) -> bool:
        """Worth retrying the whole operation now: the server or the connection failed
        mid-way (botocore has already retried each request; see S3Config)."""
        root = _root_cause(exc)
        return _fault(root) is Fault.UNAVAILABLE and not _named(root, _CONNECT_ERRORS)

    def _translate(self, exc: BaseException, key: str) -> BaseException:
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        uri = self.uri(key)
        where = self.endpoint_url or "the AWS default endpoint"
        root = _root_cause(exc)
        if isinstance(root, NoCredentialsError | PartialCredentialsError):
            return CredentialsError(f"no S3 credentials for {uri}: {_CRED_HINT}", uri)
        if _named(root, _CONNECT_ERRORS):
            return EndpointUnreachableError(
                f"cannot reach S3 endpoint {where} for {uri} (set KUBETUNE_S3_ENDPOINT or "
                "spec.storage.endpoint)",
                uri,
            )
        fault = _fault(root)
        code = _code(root) if isinstance(root, ClientError) else type(root).__name__
        if fault is Fault.NOT_FOUND:
            # HEAD answers a bare 404 for a missing bucket too: tell the two apart.
            if code == "NoSuchBucket" or not self._bucket_exists():
                return self._no_bucket(uri, where)
            return ObjectNotFoundError(f"no such object: {uri}", uri)
        if fault is Fault.ACCESS_DENIED:
            return CredentialsError(f"access denied to {uri} ({code}): {_CRED_HINT}", uri)
        if fault is Fault.UNAVAILABLE:
            attempts = self.config.resolved_retries()["total_max_attempts"] * self.retries
            return StorageUnavailableError(
                f"S3 endpoint {where} is unavailable for {uri} ({code}: {_detail(root)}) after "
                f"{attempts} attempts (transient: retry later)",
                uri,
            )
        if fault is Fault.LOCAL_DISK and isinstance(root, OSError):
            return LocalDiskError(
                f"{uri}: local write failed: {root.strerror or root}",
                uri,
                errno=root.errno,
                path=root.filename,
            )
        if isinstance(root, ClientError):
            return StorageError(f"S3 error {code} for {uri} at {where}: {_detail(root)}", uri)
        if isinstance(root, OSError) and not isinstance(root, ConnectionError):
            return StorageError(f"{uri}: local I/O error: {root}", uri)
        return StorageError(f"S3 operation on {uri} at {where} failed: {root}", uri)

    def _no_bucket(self, uri: str, where: str) -> BucketNotFoundError:
        return BucketNotFoundError(f"bucket '{self.bucket}' does not exist at {where} ({uri})", uri)

    def _bucket_exists(self) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            return _code(exc) not in ("404", "NoSuchBucket", "NotFound")
        except Exception:
            return True  # can't tell; report the object as missing
        return True

    def bucket_exists(self) -> bool:
        """True when the bucket exists (and we may see it); errors name the endpoint."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise self._translate(exc, "") from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "") from exc
        return True


class _Progress:
    """An s3transfer subscriber that forwards byte counts to our callback."""

    def __init__(self, callback: Callback) -> None:
        self._callback = callback

    def on_queued(self, **kwargs: Any) -> None:
        pass

    def on_progress(self, bytes_transferred: int, **kwargs: Any) -> None:
        self._callback(bytes_transferred)

    def on_done(self, **kwargs: Any) -> None:
        pass


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _detail(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Message") or exc)
    return str(exc)


def _fault(root: BaseException) -> Fault:
    """The fault of an unwrapped botocore / OS exception (tables in storage.errors)."""
    from botocore.exceptions import ClientError

    if isinstance(root, StorageError):
        return root.fault
    if isinstance(root, ClientError):
        return s3_code_fault(_code(root))
    if _named(root, _TRANSPORT_ERRORS):
        return Fault.UNAVAILABLE
    if isinstance(root, OSError) and (fault := local_fault(root)) is not None:
        return fault
    return Fault.OTHER


def _named(exc: BaseException, names: tuple[str, ...]) -> bool:
    """Is ``exc`` an instance of a class called one of ``names`` (or of a subclass)?"""
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def _root_cause(exc: BaseException) -> BaseException:
    """boto3 wraps client errors (S3UploadFailedError, RetriesExceededError); unwrap them."""
    seen: set[int] = set()
    cur: BaseException = exc
    while id(cur) not in seen:
        seen.add(id(cur))
        nxt = getattr(cur, "last_exception", None) or cur.__cause__ or cur.__context__
        if nxt is None or not _is_wrapper(cur):
            return cur
        cur = nxt
    return cur


def _is_wrapper(exc: BaseException) -> bool:
    return type(exc).__module__.startswith(("boto3", "s3transfer"))


def _forget_partial(item: s5cmd.Item) -> None:
    """A file s5cmd delivered verified: drop what an earlier Python attempt left of it."""
    partial = partial_path(item.dest)
    partial.unlink(missing_ok=True)
    journal_path(partial).unlink(missing_ok=True)
