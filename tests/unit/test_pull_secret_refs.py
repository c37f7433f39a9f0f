"""spec.pod.imagePullSecrets: at most MAX_PULL_SECRETS, refused by the schema naming the
field, and the admission policy has a rule for every entry the CRD allows (a CEL expression
may make only two authorizer calls, so one rule checking them all fails for 3 or more)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.api import format_errors
from orchestrator.api.crdgen import crds
from orchestrator.api.pod import MAX_PULL_SECRETS, PodOptions

from .test_env_secret_refs import _policy

pytestmark = pytest.mark.unit


def test_at_most_max_pull_secrets_refused_naming_the_field() -> None:
    secrets = [{"name": f"reg{i}"} for i in range(MAX_PULL_SECRETS + 1)]
    PodOptions.model_validate({"imagePullSecrets": secrets[:-1]})
    with pytest.raises(ValidationError) as info:
        PodOptions.model_validate({"imagePullSecrets": secrets})
    msg = format_errors(info.value, "spec.pod.")
    assert msg == (f"spec.pod.imagePullSecrets: pod.imagePullSecrets may name at most "
                   f"{MAX_PULL_SECRETS} Secrets: the admission policy checks each one against "
                   f"the creator's rights, not {MAX_PULL_SECRETS + 1}"), msg


def test_the_crds_bound_pull_secrets_at_the_policys_count() -> None:
    ftj = crds()["kubetune.io_finetunejobs.yaml"]["spec"]["versions"][0]["schema"]
    pod = ftj["openAPIV3Schema"]["properties"]["spec"]["properties"]["pod"]
    assert pod["properties"]["imagePullSecrets"]["maxItems"] == MAX_PULL_SECRETS
    fts = crds()["kubetune.io_finetunesweeps.yaml"]["spec"]["versions"][0]["schema"]
    template = fts["openAPIV3Schema"]["properties"]["spec"]["properties"]["template"]
    assert (template["properties"]["pod"]["properties"]["imagePullSecrets"]["maxItems"]
            == MAX_PULL_SECRETS)


def test_the_admission_policy_checks_every_pull_secret_the_crd_allows() -> None:
    """One authorizer rule per pull-secret index (an expression may make two authorizer
    calls), skipping a Secret an earlier entry named, plus the bound itself; the chart renders
    the same (test_helm_kustomize)."""
    validations = _policy("base/admission-policy.yaml")["spec"]["validations"]
    per_entry = [v for v in validations if "variables.pullSecrets[" in v["expression"]]
    assert len(per_entry) == MAX_PULL_SECRETS
    for i, v in enumerate(per_entry):
        assert v["expression"].startswith(f"variables.pullSecrets.size() <= {i} || ")
        assert (f"variables.pullSecrets.indexOf(variables.pullSecrets[{i}]) < {i}"
                in v["expression"])
        assert v["expression"].count("authorizer.") == 1
        assert f"name(variables.pullSecrets[{i}]).check('get')" in v["expression"]
        assert f"'spec.pod.imagePullSecrets[{i}]: '" in v["messageExpression"]
        assert f"variables.pullSecrets[{i}]" in v["messageExpression"]
    assert any(v["expression"] == f"variables.pullSecrets.size() <= {MAX_PULL_SECRETS}"
               for v in validations)
    # no rule makes an authorizer call per pull Secret any more
    assert not any("pullSecrets.all(" in v["expression"] for v in validations)
