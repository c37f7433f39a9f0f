"""A sweep's objects are rendered (not built inline by the reconciler), owned by the sweep."""

from __future__ import annotations

import base64
import json

import pytest

from orchestrator.render.sweep import render_key_secret, render_token_secret, render_trial

pytestmark = pytest.mark.unit

SWEEP = {"name": "s", "namespace": "team", "uid": "u-1"}


def test_sweep_objects_are_owned_by_the_sweep_and_labelled() -> None:
    objs = [
        render_key_secret(SWEEP, "k" * 32),
        render_token_secret(SWEEP, "s-3", 3, "kt1.tok"),
        render_trial(SWEEP, "s-3", 3, {"method.rank": 8}, {"model": {"uri": "s3://m"}}),
    ]
    for obj in objs:
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
                         "name": "s", "uid": "u-1", "controller": True,
                         "blockOwnerDeletion": True}
        assert obj["metadata"]["namespace"] == "team"
        assert obj["metadata"]["labels"]["kubetune.io/sweep"] == "s"
    key, token, trial = objs
    assert key["metadata"]["name"] == "s-report-key"
    assert base64.b64decode(key["data"]["key"]).decode() == "k" * 32
    assert token["metadata"]["name"] == "s-3-report-token"
    assert token["metadata"]["labels"]["kubetune.io/trial"] == "3"
    assert trial["kind"] == "FineTuneJob" and trial["spec"] == {"model": {"uri": "s3://m"}}
    params = json.loads(trial["metadata"]["annotations"]["kubetune.io/trial-parameters"])
    assert params == {"method.rank": 8}
