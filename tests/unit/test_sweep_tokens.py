from __future__ import annotations

import pytest

from orchestrator.sweep.tokens import (
    bearer_token,
    derive_sweep_key,
    generate_secret,
    mint_job_token,
    mint_token,
    verify_job_token,
    verify_token,
)

pytestmark = pytest.mark.unit


def test_token_binds_secret_sweep_and_trial() -> None:
    key = generate_secret()
    uid = "3f1c9a9e-0000-4000-8000-000000000001"
    token = mint_token(key, uid, 7)
    assert token.startswith("kt1.") and mint_token(key, uid, 7) == token
    assert verify_token(key, token, uid, 7)
    assert not verify_token(key, token, uid, 8)  # another trial of the same sweep
    assert not verify_token(key, token, "other-uid", 7)  # same trial number, other sweep
    assert not verify_token(generate_secret(), token, uid, 7)  # another controller's key
    assert not verify_token(key, token[:-1] + ("A" if token[-1] != "A" else "B"), uid, 7)
    assert not verify_token(key, None, uid, 7) and not verify_token(key, "", uid, 7)
    # (uid "a1", trial 2) and (uid "a", trial 12) must not collide.
    assert mint_token(key, "a1", 2) != mint_token(key, "a", 12)


def test_weak_secret_rejected_and_bearer_parsing() -> None:
    with pytest.raises(ValueError, match=r"at least 16 bytes"):
        mint_token("short", "uid", 1)
    assert bearer_token("Bearer kt1.abc") == "kt1.abc"
    assert bearer_token("bearer  kt1.abc ") == "kt1.abc"
    assert bearer_token("Basic xyz") is None and bearer_token(None) is None


def test_sweep_keys_are_hkdf_of_the_master_key() -> None:
    """Each sweep's key is RFC 5869 HKDF-SHA256(master, salt=context, info=sweep uid): checked
    against an independent implementation, and distinct per sweep uid and per master key."""
    hkdf = pytest.importorskip("cryptography.hazmat.primitives.kdf.hkdf")
    from cryptography.hazmat.primitives import hashes

    master = generate_secret().encode()
    uid = "3f1c9a9e-0000-4000-8000-000000000001"
    expected = hkdf.HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"kubetune/report/v1", info=uid.encode()
    ).derive(master)
    assert derive_sweep_key(master, uid) == expected
    assert derive_sweep_key(master, uid + "x") != expected
    assert derive_sweep_key(generate_secret(), uid) != expected
    # a token minted with one sweep's derived key is refused for another sweep
    token = mint_token(derive_sweep_key(master, uid), uid, 0)
    assert not verify_token(derive_sweep_key(master, "other"), token, "other", 0)
    with pytest.raises(ValueError):
        derive_sweep_key(master, "")


def test_job_progress_tokens_are_per_job_and_never_trial_tokens() -> None:
    master = generate_secret()
    token = mint_job_token(master, "job-uid-1")
    assert verify_job_token(master, token, "job-uid-1")
    assert not verify_job_token(master, token, "job-uid-2")
    assert not verify_job_token(generate_secret(), token, "job-uid-1")
    assert not verify_job_token(master, None, "job-uid-1")
    # the same uid as a sweep's, trial 0: a different context, a different token
    assert token != mint_token(derive_sweep_key(master, "job-uid-1"), "job-uid-1", 0)
