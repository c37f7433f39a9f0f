from __future__ import annotations

import pytest

from orchestrator.sweep.tokens import bearer_token, generate_secret, mint_token, verify_token

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
