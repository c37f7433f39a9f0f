"""spec.pod.env[].valueFrom.secretKeyRef: trainer env taken from a key of a Secret in the
job's namespace (experiment-tracking keys and tokens), with the guarantees of
spec.storage.credentialsSecret: validated names, referenced and never copied, the
controller's trainer.env defaults may use them too, a missing Secret is a SecretMissing
condition naming the field, and the admission policy has a rule for every entry the CRD
allows."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from orchestrator.api import format_errors
from orchestrator.api.pod import MAX_ENV_SECRET_REFS, PodOptions
from orchestrator.controller.jobs import CheckSecret, CreateChildren, Snapshot, decide
from orchestrator.controller.settings import ControllerSettings
from orchestrator.render import (
    RenderDefaults,
    SecretRef,
    render_all,
    render_job,
    secret_refs,
)

from .test_controller_reconcile import SPEC
from .test_render_job import META, env_of, make_spec

pytestmark = pytest.mark.unit

WANDB = {"name": "WANDB_API_KEY",
         "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}}
MLFLOW = {"name": "MLFLOW_TRACKING_TOKEN",
          "valueFrom": {"secretKeyRef": {"name": "mlflow", "key": "token"}}}


def _errors(env: list[dict[str, Any]]) -> str:
    with pytest.raises(ValidationError) as info:
        PodOptions.model_validate({"env": env})
    return format_errors(info.value, "spec.pod.")


def test_value_and_secret_key_ref_together_are_refused_naming_the_field() -> None:
    msg = _errors([{**WANDB, "value": "plain"}])
    assert msg.startswith("spec.pod.env.0: pod.env: set either value (a literal) or "
                          "valueFrom.secretKeyRef (a Secret key), not both"), msg
    assert "WANDB_API_KEY has both" in msg


@pytest.mark.parametrize(("ref", "problem"), [
    ({"name": "WandB", "key": "api-key"}, "secretKeyRef.name: secretKeyRef.name must be a Secret"),
    ({"name": "wandb", "key": "api key"}, "secretKeyRef.key: secretKeyRef.key 'api key'"),
    ({"name": "wandb", "key": ".."}, "secretKeyRef.key: secretKeyRef.key '..'"),
    ({"name": "wandb", "key": "..data"}, "secretKeyRef.key: secretKeyRef.key '..data'"),
    ({"name": "wandb"}, "secretKeyRef.key: Field required"),
])
def test_secret_names_and_keys_are_checked(ref: dict[str, str], problem: str) -> None:
    msg = _errors([{"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": ref}}])
    assert f"spec.pod.env.0.valueFrom.{problem}" in msg, msg


def test_only_secret_key_refs_and_the_reserved_names_still_apply() -> None:
    msg = _errors([{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}])
    assert "valueFrom.configMapKeyRef: unknown field" in msg
    # a Secret cannot be smuggled into a variable kubetune owns either
    msg = _errors([{**WANDB, "name": "AWS_SECRET_ACCESS_KEY"}])
    assert "pod.env must not set a variable kubetune owns" in msg


def test_at_most_max_env_secret_refs_entries_read_secrets() -> None:
    refs = [{"name": f"V{i}", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
            for i in range(MAX_ENV_SECRET_REFS + 1)]
    PodOptions.model_validate({"env": refs[:-1]})
    assert f"at most {MAX_ENV_SECRET_REFS} variables from Secrets" in _errors(refs)


def test_secret_keys_are_referenced_never_copied() -> None:
    spec = make_spec(pod={"env": [WANDB, {"name": "WANDB_PROJECT", "value": "llm"}, MLFLOW,
                                  {"name": "EMPTY"}]})
    job = render_job(META, spec, 1)
    env = env_of(job)
    assert env["WANDB_API_KEY"] == {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": "wandb", "key": "api-key", "optional": False}}}
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow"
    assert env["WANDB_PROJECT"] == {"name": "WANDB_PROJECT", "value": "llm"}
    assert env["EMPTY"] == {"name": "EMPTY", "value": ""}


def test_trainer_env_defaults_may_reference_secrets_and_the_spec_wins_per_name() -> None:
    settings = ControllerSettings.from_env({"KUBETUNE_TRAINER_ENV": json.dumps({
        "NCCL_DEBUG": "WARN",
        "WANDB_API_KEY": {"secretKeyRef": {"name": "team-wandb", "key": "key"}},
        "HF_TOKEN": {"secretKeyRef": {"name": "hf", "key": "token"}},
    })})
    defaults = settings.render_defaults()
    spec = make_spec(pod={"env": [WANDB, {"name": "HF_TOKEN", "value": "public"}]})
    env = env_of(render_job(META, spec, 1, defaults))
    assert env["NCCL_DEBUG"]["value"] == "WARN"
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "wandb"  # spec wins
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "value": "public"}  # a literal wins too
    env = env_of(render_job(META, make_spec(), 1, defaults))
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "hf", "key": "token", "optional": False}


@pytest.mark.parametrize(("value", "message"), [
    ({"secretKeyRef": {"name": "Bad_Name", "key": "k"}},
     "KUBETUNE_TRAINER_ENV WANDB_API_KEY: secretKeyRef.name: secretKeyRef.name must be"),
    ({"secretKeyRef": {"name": "wandb"}},
     "KUBETUNE_TRAINER_ENV WANDB_API_KEY: secretKeyRef.key: Field required"),
    ({"configMapKeyRef": {"name": "c", "key": "k"}},
     "KUBETUNE_TRAINER_ENV WANDB_API_KEY must be a string or"),
    (3, "KUBETUNE_TRAINER_ENV WANDB_API_KEY must be a string or"),
])
def test_bad_env_defaults_stop_the_controller_naming_the_setting(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        ControllerSettings.from_env({"KUBETUNE_TRAINER_ENV": json.dumps({"WANDB_API_KEY": value})})
    assert message in str(info.value)


def test_secret_refs_name_every_secret_the_pods_read_and_where_it_comes_from() -> None:
    defaults = RenderDefaults(credentials_secret="s3-default", env={
        "HF_TOKEN": ControllerSettings(trainer_env={"HF_TOKEN": {
            "secretKeyRef": {"name": "hf", "key": "token"}}}).render_defaults().env["HF_TOKEN"]})
    spec = make_spec(pod={"env": [WANDB]})
    spec = spec.model_copy(update={"storage": spec.storage.model_copy(
        update={"credentials_secret": None})})
    assert secret_refs(spec, defaults) == [
        SecretRef("s3-default", "spec.storage.credentialsSecret, the controller's default",
                  ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")),
        SecretRef("hf", "env HF_TOKEN, the controller's default (trainer.env)", ("token",)),
        SecretRef("wandb", "spec.pod.env[WANDB_API_KEY].valueFrom.secretKeyRef", ("api-key",)),
    ]


def _snap(env: list[dict[str, Any]]) -> Snapshot:
    spec = copy.deepcopy(SPEC)
    spec["pod"] = {"env": env}
    ftj = {"kind": "FineTuneJob",
           "metadata": {"name": "j", "namespace": "ns", "uid": "u1", "generation": 1},
           "spec": spec}
    return Snapshot(ftj, {}, [])


def test_a_missing_env_secret_is_a_condition_naming_the_field() -> None:
    defaults = ControllerSettings().render_defaults()
    snap = _snap([WANDB, MLFLOW, {**MLFLOW, "name": "MLFLOW_TOKEN_TOO"}])
    _, actions = decide(snap, defaults)
    assert [a for a in actions if isinstance(a, CheckSecret)] == [
        CheckSecret("s3"), CheckSecret("wandb"), CheckSecret("mlflow")]
    status, actions = decide(snap, defaults, {"s3": True, "wandb": False, "mlflow": False})
    valid = next(c for c in status["conditions"] if c["type"] == "Valid")
    assert (valid["status"], valid["reason"]) == ("False", "SecretMissing")
    assert status["phase"] == "Pending" and status["message"] == valid["message"]
    assert valid["message"] == (
        "Secret 'wandb' (spec.pod.env[WANDB_API_KEY].valueFrom.secretKeyRef) not found in "
        "namespace ns: create it with key api-key; Secret 'mlflow' "
        "(spec.pod.env[MLFLOW_TRACKING_TOKEN].valueFrom.secretKeyRef, "
        "spec.pod.env[MLFLOW_TOKEN_TOO].valueFrom.secretKeyRef) not found in namespace ns: "
        "create it with key token")
    assert not any(isinstance(a, CreateChildren) for a in actions)
    # all there: the children are created, with the references in the pod
    status, actions = decide(snap, defaults, {"s3": True, "wandb": True, "mlflow": True})
    (create,) = [a for a in actions if isinstance(a, CreateChildren)]
    job = next(o for o in render_all(META, create.spec, 1, defaults) if o["kind"] == "Job")
    assert env_of(job)["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "wandb"


def _policy(path: str) -> dict[str, Any]:
    from tests.cluster.deploy_helpers import MANIFESTS

    docs = yaml.safe_load_all((MANIFESTS / path).read_text(encoding="utf-8"))
    return next(d for d in docs if d and d["kind"] == "ValidatingAdmissionPolicy")


def test_the_admission_policy_checks_every_env_entry_the_crd_allows() -> None:
    """One authorizer rule per env entry that may read a Secret (an expression may make two
    authorizer calls), plus the bound itself; the chart renders the same (test_helm_kustomize)."""
    validations = _policy("base/admission-policy.yaml")["spec"]["validations"]
    per_entry = [v for v in validations if "variables.envSecretNames[" in v["expression"]]
    assert len(per_entry) == MAX_ENV_SECRET_REFS
    for i, v in enumerate(per_entry):
        assert f"variables.envSecrets.size() <= {i}" in v["expression"]
        assert v["expression"].count("authorizer.") == 1
        assert f"variables.envSecrets[{i}].env" in v["messageExpression"]
    assert any(v["expression"] == f"variables.envSecrets.size() <= {MAX_ENV_SECRET_REFS}"
               for v in validations)
