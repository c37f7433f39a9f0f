"""A sweep's objects are rendered (not built inline by the reconciler), owned by the sweep."""

from __future__ import annotations

import base64
import json

import pytest

from orchestrator.render.sweep import render_report_master_secret, render_trial

pytestmark = pytest.mark.unit

SWEEP = {"name": "s", "namespace": "team", "uid": "u-1"}


def test_trials_are_owned_by_the_sweep_and_labelled() -> None:
    trial = render_trial(SWEEP, "s-3", 3, {"method.rank": 8}, {"model": {"uri": "s3://m"}})
    (owner,) = trial["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
                     "name": "s", "uid": "u-1", "controller": True,
                     "blockOwnerDeletion": True}
    assert trial["metadata"]["namespace"] == "team"
    assert trial["metadata"]["labels"]["kubetune.io/sweep"] == "s"
    assert trial["metadata"]["labels"]["kubetune.io/trial"] == "3"
    assert trial["kind"] == "FineTuneJob" and trial["spec"] == {"model": {"uri": "s3://m"}}
    params = json.loads(trial["metadata"]["annotations"]["kubetune.io/trial-parameters"])
    assert params == {"method.rank": 8}


def test_report_master_key_lives_in_the_controller_namespace_owned_by_nothing() -> None:
    secret = render_report_master_secret("kubetune-system", "kubetune-report-key", "k" * 32)
    assert secret["metadata"]["namespace"] == "kubetune-system"
    assert "ownerReferences" not in secret["metadata"]  # outlives any sweep and upgrade
    assert base64.b64decode(secret["data"]["key"]).decode() == "k" * 32
