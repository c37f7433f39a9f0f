"""HMAC tokens that let a trial's pods report intermediate values for that trial only.

The controller holds one secret key (a Secret it creates once). For each trial it mints
``kt1.<base64url(HMAC-SHA256(key, "kubetune/report/v1" | sweep uid | trial number))>`` and
hands it to the trial's pods (as KUBETUNE_REPORT_TOKEN from a per-trial Secret). The
report endpoint recomputes the MAC for the sweep uid and trial number named in the request
and compares in constant time, so a token is useless for any other trial or sweep — and
binding the sweep's *uid* (not its name) means a deleted-and-recreated sweep of the same
name does not accept old tokens. Nothing is stored per token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

TOKEN_PREFIX = "kt1."
_CONTEXT = b"kubetune/report/v1"


def generate_secret(nbytes: int = 32) -> str:
    """A fresh random key, URL-safe text (fits a Secret's stringData)."""
    return secrets.token_urlsafe(nbytes)


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


def bearer_token(authorization: str | None) -> str | None:
    """The token from an ``Authorization: Bearer <token>`` header value."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None
