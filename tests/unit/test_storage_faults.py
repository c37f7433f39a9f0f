"""Storage failures are classified by one table: missing objects and denied access are
permanent (the job fails at once, saying what to fix); 5xx, throttling, timeouts, connection
errors and a full workspace volume are transient (exit 74, the attempt is retried)."""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from orchestrator.api.exit_codes import PERMANENT, PERMANENT_REASONS, ExitCode
from orchestrator.controller import jobs
from orchestrator.local.executor import Outcome
from orchestrator.storage import (
    BucketNotFoundError,
    CredentialsError,
    EndpointUnreachableError,
    Fault,
    LocalDiskError,
    ObjectNotFoundError,
    S3Config,
    S3Store,
    StorageError,
    StorageUnavailableError,
    fault_of,
)
from orchestrator.storage.errors import S3_ERROR_CODES, s3_code_fault
from orchestrator.trainer import artifact, errors
from orchestrator.trainer.errors import (
    DataError,
    ModelError,
    OutputError,
    StorageFailure,
    storage_failure,
)

pytestmark = pytest.mark.unit

NOT_FOUND, DENIED, UNAVAILABLE = Fault.NOT_FOUND, Fault.ACCESS_DENIED, Fault.UNAVAILABLE

S3_CODES = [
    ("NoSuchKey", NOT_FOUND), ("NoSuchBucket", NOT_FOUND), ("404", NOT_FOUND),
    ("NotFound", NOT_FOUND),
    ("AccessDenied", DENIED), ("403", DENIED), ("InvalidAccessKeyId", DENIED),
    ("SignatureDoesNotMatch", DENIED), ("ExpiredToken", DENIED),
    ("SlowDown", UNAVAILABLE), ("503", UNAVAILABLE), ("500", UNAVAILABLE),
    ("502", UNAVAILABLE), ("504", UNAVAILABLE), ("599", UNAVAILABLE),
    ("RequestTimeout", UNAVAILABLE), ("ThrottlingException", UNAVAILABLE),
    ("InternalError", UNAVAILABLE), ("ServiceUnavailable", UNAVAILABLE), ("429", UNAVAILABLE),
    ("InvalidArgument", Fault.OTHER), ("400", Fault.OTHER), ("", Fault.OTHER),
]


@pytest.mark.parametrize(("code", "fault"), S3_CODES, ids=[c or "empty" for c, _ in S3_CODES])
def test_s3_error_code_table(code: str, fault: Fault) -> None:
    assert s3_code_fault(code) is fault


def test_every_table_entry_is_a_known_fault() -> None:
    assert set(S3_ERROR_CODES.values()) <= {NOT_FOUND, DENIED, UNAVAILABLE}


def _client_error(code: str, status: int, op: str = "GetObject") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} message"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


class _Client:
    """Stands in for the boto3 client where _translate asks whether the bucket exists."""

    def __init__(self, bucket_exists: bool = True) -> None:
        self.bucket_exists = bucket_exists

    def head_bucket(self, Bucket: str) -> dict[str, Any]:
        if not self.bucket_exists:
            raise _client_error("404", 404, "HeadBucket")
        return {}


def _store(bucket_exists: bool = True) -> S3Store:
    return S3Store("models", S3Config(endpoint_url="http://s3.storage:8333", max_attempts=3),
                   client=_Client(bucket_exists), progress=False, retries=2)


TRANSLATIONS = [
    (_client_error("NoSuchKey", 404), True, ObjectNotFoundError, False, "no such object: "
     "s3://models/llama/config.json"),
    (_client_error("404", 404, "HeadObject"), False, BucketNotFoundError, False,
     "bucket 'models' does not exist at http://s3.storage:8333"),
    (_client_error("NoSuchBucket", 404), True, BucketNotFoundError, False, "does not exist"),
    (_client_error("AccessDenied", 403), True, CredentialsError, False,
     "access denied to s3://models/llama/config.json (AccessDenied)"),
    (_client_error("SignatureDoesNotMatch", 403), True, CredentialsError, False,
     "spec.storage.credentialsSecret"),
    (_client_error("SlowDown", 503), True, StorageUnavailableError, True,
     "S3 endpoint http://s3.storage:8333 is unavailable for s3://models/llama/config.json "
     "(SlowDown: SlowDown message) after 6 attempts"),
    (_client_error("InternalError", 500), True, StorageUnavailableError, True, "InternalError"),
    (_client_error("ThrottlingException", 400), True, StorageUnavailableError, True, "Throttl"),
    (_client_error("RequestTimeout", 400), True, StorageUnavailableError, True, "RequestTimeout"),
    (ReadTimeoutError(endpoint_url="http://s3.storage:8333"), True, StorageUnavailableError, True,
     "ReadTimeoutError"),
    (ConnectionClosedError(endpoint_url="http://s3.storage:8333"), True,
     StorageUnavailableError, True, "unavailable"),
    (EndpointConnectionError(endpoint_url="http://s3.storage:8333"), True,
     EndpointUnreachableError, False, "cannot reach S3 endpoint http://s3.storage:8333"),
    (ConnectTimeoutError(endpoint_url="http://s3.storage:8333"), True, EndpointUnreachableError,
     False, "cannot reach S3 endpoint"),
    (OSError(errno.ENOSPC, "No space left on device"), True, LocalDiskError, False,
     "local write failed: No space left on device"),
    (_client_error("InvalidArgument", 400), True, StorageError, False, "S3 error InvalidArgument"),
]


@pytest.mark.parametrize(("exc", "bucket", "kind", "retried", "text"), TRANSLATIONS,
                         ids=[f"{type(t[0]).__name__}-{i}" for i, t in enumerate(TRANSLATIONS)])
def test_s3_store_retries_and_translates_by_fault(exc: Exception, bucket: bool, kind: type,
                                                  retried: bool, text: str) -> None:
    """Only UNAVAILABLE is retried in process by the store (connect errors by botocore
    only); every error becomes one StorageError whose fault decides the exit code."""
    store = _store(bucket)
    assert store._is_transient(exc) is retried
    out = store._translate(exc, "llama/config.json")
    assert type(out) is kind, out
    assert text in str(out)
    assert out.fault is fault_of(out)


def test_retry_config_is_bounded_and_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KUBETUNE_S3_MAX_ATTEMPTS", "KUBETUNE_S3_RETRY_MODE"):
        monkeypatch.delenv(var, raising=False)
    assert S3Config().resolved_retries() == {"total_max_attempts": 5, "mode": "standard"}
    monkeypatch.setenv("KUBETUNE_S3_MAX_ATTEMPTS", "8")
    monkeypatch.setenv("KUBETUNE_S3_RETRY_MODE", "adaptive")
    assert S3Config().resolved_retries() == {"total_max_attempts": 8, "mode": "adaptive"}
    assert S3Config(max_attempts=1).resolved_retries()["total_max_attempts"] == 1
    store = S3Store("b", S3Config(endpoint_url="http://127.0.0.1:1", access_key_id="a",
                                  secret_access_key="b"), progress=False)
    retries = store.client.meta.config.retries
    assert retries["mode"] == "adaptive" and retries["total_max_attempts"] == 8
    with pytest.raises(ValueError, match="retry mode"):
        S3Config(retry_mode="forever").resolved_retries()


LOCAL = [(errno.ENOSPC, Fault.LOCAL_DISK), (errno.EDQUOT, Fault.LOCAL_DISK),
         (errno.EFBIG, Fault.LOCAL_DISK), (errno.EIO, Fault.LOCAL_DISK),
         (errno.EACCES, Fault.OTHER), (errno.ENOENT, Fault.OTHER)]


@pytest.mark.parametrize(("num", "fault"), LOCAL, ids=[errno.errorcode[n] for n, _ in LOCAL])
def test_local_errno_table(num: int, fault: Fault) -> None:
    assert fault_of(OSError(num, "x")) is fault


def test_disk_fault_found_inside_a_wrapping_error() -> None:
    """torch.save and friends re-raise ENOSPC as their own RuntimeError."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file") from inner
    except RuntimeError as outer:
        assert errors.disk_fault_in(outer) is Fault.LOCAL_DISK
    assert errors.disk_fault_in(RuntimeError("boom")) is None


# --- what the trainer reports ------------------------------------------------------------------
OUTCOMES = [
    # fault's error, stage, exit code, reason, permanent, text in the message
    (BucketNotFoundError("bucket 'out' does not exist", "s3://out/j/"), OutputError,
     ExitCode.OUTPUT, "StorageNotFound", True, "fix spec.output.uri"),
    (ObjectNotFoundError("no such object: s3://m/x", "s3://m/x"), ModelError, ExitCode.MODEL,
     "StorageNotFound", True, "fix spec.model.uri"),
    (ObjectNotFoundError("no such object: s3://d/t", "s3://d/t"), DataError, ExitCode.DATA,
     "StorageNotFound", True, "retrying cannot help"),
    (CredentialsError("access denied to s3://m/x (AccessDenied)"), ModelError, ExitCode.MODEL,
     "StorageAccessDenied", True, "the credentials Secret 'team-s3' "
                                   "(spec.storage.credentialsSecret)"),
    (CredentialsError("access denied to s3://o/j (403)"), OutputError, ExitCode.OUTPUT,
     "StorageAccessDenied", True, "allowed to use spec.output.uri"),
    (StorageUnavailableError("S3 endpoint x is unavailable (SlowDown)"), ModelError,
     ExitCode.STORAGE, "StorageUnavailable", False, "transient"),
    (EndpointUnreachableError("cannot reach S3 endpoint x"), DataError, ExitCode.STORAGE,
     "StorageUnavailable", False, "the attempt is retried"),
    (LocalDiskError("No space left on device writing file:///w", errno=errno.ENOSPC),
     ModelError, ExitCode.STORAGE, "WorkspaceFull", False,
     "the pod's workspace volume ('workspace', an emptyDir at /workspace"),
    (OSError(errno.ENOSPC, "No space left on device"), OutputError, ExitCode.STORAGE,
     "WorkspaceFull", False, "raise its sizeLimit (spec.resources.workspaceSize)"),
    (StorageError("checksum mismatch for x"), OutputError, ExitCode.STORAGE, "StorageError",
     False, "checksum mismatch"),
]


@pytest.mark.parametrize(("exc", "stage", "code", "reason", "permanent", "text"), OUTCOMES,
                         ids=[f"{t[3]}-{t[1].__name__}" for t in OUTCOMES])
def test_storage_failure_exit_code_reason_and_fix(monkeypatch: pytest.MonkeyPatch,
                                                  exc: Exception, stage: type, code: ExitCode,
                                                  reason: str, permanent: bool,
                                                  text: str) -> None:
    monkeypatch.setitem(errors.SITE, "secret", "team-s3")
    monkeypatch.setitem(errors.SITE, "workdir", "/workspace")
    field = {ModelError: "spec.model.uri", DataError: "spec.data"}.get(stage, "spec.output.uri")
    err = storage_failure(exc, "context", field, stage)
    assert err.exit_code == code and err.reason == reason
    assert isinstance(err, stage if permanent else StorageFailure)
    assert text in str(err) and str(exc) in str(err)
    # The controller and local mode agree with the trainer on what is permanent.
    assert (err.exit_code in PERMANENT) is permanent
    assert (err.reason in PERMANENT_REASONS) is permanent
    doc = json.loads(artifact.termination_message(err.exit_code, str(err), reason=err.reason))
    assert doc["exitCode"] == int(code) and doc["reason"] == reason
    outcome = Outcome("Failed", doc["exitCode"], doc["reason"], doc["message"])
    assert outcome.permanent is permanent
    pod = jobs.PodOutcome("p-0", "0", doc["exitCode"], "Error", "", doc)
    assert jobs._is_permanent(pod) is permanent


def test_workspace_hint_outside_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(errors.SITE, "workdir", "/scratch/kt")
    err = storage_failure(OSError(errno.EFBIG, "File too large"), "writing", "")
    assert err.reason == "WorkspaceFull"
    assert "the disk holding the workspace /scratch/kt (KUBETUNE_WORKDIR)" in str(err)


def test_permanent_reasons_are_exactly_the_permanent_storage_ones() -> None:
    assert {"StorageNotFound", "StorageAccessDenied"} <= PERMANENT_REASONS
    assert not {"StorageUnavailable", "WorkspaceFull", "StorageError"} & PERMANENT_REASONS
    assert ExitCode.STORAGE not in PERMANENT and ExitCode.OUTPUT in PERMANENT
    # A pod of an older trainer image (reason StorageError, exit 74) is still retried.
    assert not jobs._is_permanent(jobs.PodOutcome("p", "0", 74, "Error", "",
                                                  {"exitCode": 74, "reason": "StorageError"}))
