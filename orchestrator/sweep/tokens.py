"""HMAC tokens that let a trial's pods report intermediate values for that trial only.

The controller holds one master key (a Secret in its own namespace, created once). Each
sweep's key is derived from it, HKDF-SHA256(master, sweep uid), so nothing is stored in the
sweeps' namespaces. For each trial the controller mints
``kt1.<base64url(HMAC-SHA256(sweep key, "kubetune/report/v1" | sweep uid | trial number))>``
and puts it in the trial's pods (KUBETUNE_REPORT_TOKEN). The report endpoint recomputes the
MAC for the sweep uid and trial number named in the request and compares in constant time,
so a token is useless for any other trial or sweep — and binding the sweep's *uid* (not its
name) means a deleted-and-recreated sweep of the same name does not accept old tokens.
Nothing is stored per sweep or per token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

TOKEN_PREFIX = "kt1."
_CONTEXT = b"kubetune/report/v1"
_PROGRESS_CONTEXT = b"kubetune/progress/v1"


def generate_secret(nbytes: int = 32) -> str:
    """A fresh random key, URL-safe text (fits a Secret's stringData)."""
    return secrets.token_urlsafe(nbytes)


def derive_sweep_key(master: str | bytes, sweep_uid: str) -> bytes:
    """The sweep's token key: HKDF-SHA256 (RFC 5869) of the master key, salted with the
    token context and bound to the sweep uid (32 bytes)."""
    if not sweep_uid:
        raise ValueError("sweep uid is empty")
    prk = hmac.new(_CONTEXT, _key(master), hashlib.sha256).digest()  # extract
    return hmac.new(prk, sweep_uid.encode() + b"\x01", hashlib.sha256).digest()  # expand, 1 block


def _key(secret: str | bytes) -> bytes:
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(key) < 16:
        raise ValueError("the report-token secret must be at least 16 bytes")
    return key


def _mac(secret: str | bytes, sweep_uid: str, trial_number: int) -> bytes:
    if not sweep_uid:
        raise ValueError("sweep uid is empty")
    if trial_number < 0:
        raise ValueError("trial number must be >= 0")
    # NUL separators: no (uid, number) pair can spell another pair's message.
    msg = b"\x00".join((_CONTEXT, sweep_uid.encode(), str(int(trial_number)).encode()))
    return hmac.new(_key(secret), msg, hashlib.sha256).digest()


def mint_token(secret: str | bytes, sweep_uid: str, trial_number: int) -> str:
    raw = _mac(secret, sweep_uid, trial_number)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def verify_token(secret: str | bytes, token: str | None, sweep_uid: str, trial_number: int) -> bool:
    """True only for the token minted for exactly this sweep uid and trial number."""
    if not token or not token.startswith(TOKEN_PREFIX):
        return False
    try:
        expected = mint_token(secret, sweep_uid, trial_number)
    except ValueError:
        return False
    return hmac.compare_digest(token.encode(), expected.encode())


def mint_job_token(master: str | bytes, job_uid: str) -> str:
    """A FineTuneJob's progress token: HMAC under HKDF(master, job uid), in its own context,
    so it posts progress for that one job and is never a trial's metrics token."""
    raw = hmac.new(derive_sweep_key(master, job_uid), _PROGRESS_CONTEXT, hashlib.sha256)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw.digest()).rstrip(b"=").decode()


def verify_job_token(master: str | bytes, token: str | None, job_uid: str) -> bool:
    if not token or not token.startswith(TOKEN_PREFIX) or not job_uid:
        return False
    return hmac.compare_digest(token.encode(), mint_job_token(master, job_uid).encode())


def bearer_token(authorization: str | None) -> str | None:
    """The token from an ``Authorization: Bearer <token>`` header value."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None
