"""Pod-level knobs of real clusters: what a user sees on the trainer pods for spec.pod,
spec.resources (extended resources, ephemeral storage, workspace size), spec.model.cacheClaim
and the distributed timeouts, and how the controller's defaults (Helm values trainer.*)
combine with them."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.api import FineTuneJobSpec, TrainerConfig
from orchestrator.controller.settings import ControllerSettings
from orchestrator.render import RenderDefaults, render_configmap, render_job

from .test_render_job import META, container, env_of, make_spec, pod_spec

pytestmark = pytest.mark.unit

EVERY_KNOB: dict[str, Any] = {
    "model": {"uri": "s3://models/llama", "cacheClaim": "model-cache"},
    "resources": {
        "cpu": "16",
        "memory": "200Gi",
        "ephemeralStorage": "300Gi",
        "workspaceSize": "250Gi",
        "extendedResources": {"vpc.amazonaws.com/efa": 4},
    },
    "pod": {
        "serviceAccountName": "trainer-irsa",
        "priorityClassName": "training-high",
        "imagePullSecrets": [{"name": "regcred"}],
        "env": [{"name": "NCCL_DEBUG", "value": "WARN"},
                {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}],
        "labels": {"example.com/team": "nlp"},
        "annotations": {"karpenter.sh/do-not-disrupt": "true"},
    },
}


def template(job: dict[str, Any]) -> dict[str, Any]:
    return dict(job["spec"]["template"])


def test_pod_identity_priority_and_pull_secrets_reach_the_pods() -> None:
    ps = pod_spec(render_job(META, make_spec(**EVERY_KNOB), 1))
    assert ps["serviceAccountName"] == "trainer-irsa"
    assert ps["priorityClassName"] == "training-high"
    assert ps["imagePullSecrets"] == [{"name": "regcred"}]
    # cloud identity never needs the Kubernetes API token: IRSA/Workload Identity webhooks
    # project their own, and the trainer does not talk to the API server
    assert ps["automountServiceAccountToken"] is False


def test_extra_env_comes_after_kubetunes_own() -> None:
    job = render_job(META, make_spec(**EVERY_KNOB), 1)
    names = [e["name"] for e in container(job)["env"]]
    assert names[-2:] == ["NCCL_DEBUG", "NCCL_SOCKET_IFNAME"]
    assert env_of(job)["NCCL_SOCKET_IFNAME"] == {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}
    assert len(names) == len(set(names))


def test_env_values_are_literal() -> None:
    spec = make_spec(pod={"env": [{"name": "NCCL_ALGO", "value": "$(AWS_SECRET_ACCESS_KEY)"}]})
    env = env_of(render_job(META, spec, 1))
    assert env["NCCL_ALGO"]["value"] == "$$(AWS_SECRET_ACCESS_KEY)"  # the kubelet keeps "$("


def test_pod_labels_and_annotations_keep_the_controllers_own() -> None:
    tpl = template(render_job(META, make_spec(**EVERY_KNOB), 1))
    labels, annotations = tpl["metadata"]["labels"], tpl["metadata"]["annotations"]
    assert labels["example.com/team"] == "nlp"
    assert labels["kubetune.io/job"] == "support-lora"
    assert labels["app.kubernetes.io/component"] == "trainer"
    assert annotations["karpenter.sh/do-not-disrupt"] == "true"
    assert annotations["kubectl.kubernetes.io/default-container"] == "trainer"


def test_extended_resources_ephemeral_storage_and_workspace_limit() -> None:
    job = render_job(META, make_spec(**EVERY_KNOB), 1)
    res = container(job)["resources"]
    assert res["requests"]["vpc.amazonaws.com/efa"] == res["limits"]["vpc.amazonaws.com/efa"] == "4"
    assert res["requests"]["nvidia.com/gpu"] == "8"
    assert res["requests"]["ephemeral-storage"] == "300Gi"
    assert "ephemeral-storage" not in res["limits"]  # the workspace sizeLimit is the cap
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    assert volumes["workspace"] == {"name": "workspace", "emptyDir": {"sizeLimit": "250Gi"}}


def test_model_cache_claim_is_mounted_where_downloads_go() -> None:
    job = render_job(META, make_spec(**EVERY_KNOB), 1)
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "model-cache"}
    mounts = {m["name"]: m for m in container(job)["volumeMounts"]}
    assert mounts["model-cache"] == {"name": "model-cache", "mountPath": "/var/cache/kubetune"}
    env = env_of(job)
    assert env["HF_HOME"]["value"] == "/var/cache/kubetune/huggingface"
    assert env["KUBETUNE_MODEL_CACHE"]["value"] == "/var/cache/kubetune"


def test_without_a_cache_claim_downloads_stay_in_the_scratch_volume() -> None:
    job = render_job(META, make_spec(), 1)
    assert "model-cache" not in {v["name"] for v in pod_spec(job)["volumes"]}
    env = env_of(job)
    assert env["HF_HOME"]["value"] == "/workspace/.cache/huggingface"
    assert "KUBETUNE_MODEL_CACHE" not in env
    ps = pod_spec(job)
    assert "serviceAccountName" not in ps and "imagePullSecrets" not in ps
    assert {v["name"]: v for v in ps["volumes"]}["workspace"]["emptyDir"] == {}


def test_hostile_spec_cannot_reach_the_host_or_privileges() -> None:
    ps = pod_spec(render_job(META, make_spec(**EVERY_KNOB), 1))
    kinds = {k for v in ps["volumes"] for k in v if k != "name"}
    assert kinds <= {"configMap", "emptyDir", "persistentVolumeClaim"}
    assert not any(k in ps for k in ("hostNetwork", "hostPID", "hostIPC"))
    sc = container({"spec": {"template": {"spec": ps}}})["securityContext"]
    assert sc == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                  "runAsNonRoot": True}
    assert ps["securityContext"]["runAsNonRoot"] is True


def test_rendezvous_timeout_goes_to_torchrun() -> None:
    spec = make_spec(distributed={"nodes": 2, "gpusPerNode": 8, "rendezvousTimeoutSeconds": 900})
    assert "--rdzv-conf=timeout=900" in container(render_job(META, spec, 1))["args"]


def test_collective_timeout_reaches_the_trainer_config() -> None:
    spec = make_spec(distributed={"nodes": 2, "gpusPerNode": 8, "collectiveTimeoutSeconds": 300})
    cm = render_configmap(META, spec, 1)
    config = TrainerConfig.from_json(cm["data"]["config.json"])
    assert config.spec.distributed.collective_timeout_seconds == 300


# --- controller defaults (Helm values trainer.*) --------------------------------------------

DEFAULTS = RenderDefaults(
    service_account="default-irsa",
    priority_class="training-low",
    image_pull_secrets=("cluster-regcred",),
    env={"NCCL_DEBUG": "INFO", "NCCL_IB_DISABLE": "0"},
    pod_labels={"example.com/cost-center": "ml", "example.com/team": "platform"},
    pod_annotations={"example.com/owner": "platform"},
    extended_resources={"vpc.amazonaws.com/efa": 1, "rdma/ib": 1},
    ephemeral_storage="100Gi",
    workspace_size="90Gi",
    model_cache_claim="shared-cache",
)


def test_controller_defaults_fill_what_the_spec_leaves_out() -> None:
    job = render_job(META, make_spec(), 1, DEFAULTS)
    ps = pod_spec(job)
    assert ps["serviceAccountName"] == "default-irsa"
    assert ps["priorityClassName"] == "training-low"
    assert ps["imagePullSecrets"] == [{"name": "cluster-regcred"}]
    res = container(job)["resources"]
    assert res["requests"]["ephemeral-storage"] == "100Gi"
    assert res["limits"]["rdma/ib"] == "1"
    volumes = {v["name"]: v for v in ps["volumes"]}
    assert volumes["workspace"]["emptyDir"] == {"sizeLimit": "90Gi"}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "shared-cache"
    assert env_of(job)["NCCL_DEBUG"]["value"] == "INFO"


def test_the_spec_wins_over_controller_defaults() -> None:
    job = render_job(META, make_spec(**EVERY_KNOB), 1, DEFAULTS)
    ps = pod_spec(job)
    assert ps["serviceAccountName"] == "trainer-irsa"
    assert ps["priorityClassName"] == "training-high"
    # pull secrets: both; env/labels/annotations/extended resources: merged, spec wins per key
    assert ps["imagePullSecrets"] == [{"name": "cluster-regcred"}, {"name": "regcred"}]
    env = env_of(job)
    assert env["NCCL_DEBUG"]["value"] == "WARN" and env["NCCL_IB_DISABLE"]["value"] == "0"
    labels = template(job)["metadata"]["labels"]
    assert labels["example.com/team"] == "nlp" and labels["example.com/cost-center"] == "ml"
    assert template(job)["metadata"]["annotations"]["example.com/owner"] == "platform"
    res = container(job)["resources"]
    assert res["limits"]["vpc.amazonaws.com/efa"] == "4" and res["limits"]["rdma/ib"] == "1"
    assert res["requests"]["ephemeral-storage"] == "300Gi"
    volumes = {v["name"]: v for v in ps["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "model-cache"


def test_defaults_do_not_change_the_trainer_config() -> None:
    spec = make_spec()
    plain = render_configmap(META, spec, 1)
    assert render_configmap(META, spec, 1, DEFAULTS)["data"] == plain["data"]


def test_settings_from_env_become_render_defaults() -> None:
    settings = ControllerSettings.from_env({
        "KUBETUNE_TRAINER_SERVICE_ACCOUNT": "default-irsa",
        "KUBETUNE_TRAINER_PRIORITY_CLASS": "training-low",
        "KUBETUNE_TRAINER_IMAGE_PULL_SECRETS": "cluster-regcred, other",
        "KUBETUNE_TRAINER_ENV": '{"NCCL_DEBUG": "INFO"}',
        "KUBETUNE_TRAINER_POD_LABELS": '{"example.com/team": "platform"}',
        "KUBETUNE_TRAINER_POD_ANNOTATIONS": '{"example.com/owner": "platform"}',
        "KUBETUNE_TRAINER_EXTENDED_RESOURCES": '{"vpc.amazonaws.com/efa": 4}',
        "KUBETUNE_TRAINER_EPHEMERAL_STORAGE": "100Gi",
        "KUBETUNE_TRAINER_WORKSPACE_SIZE": "90Gi",
        "KUBETUNE_TRAINER_MODEL_CACHE_CLAIM": "shared-cache",
    })
    d = settings.render_defaults()
    assert d.service_account == "default-irsa" and d.priority_class == "training-low"
    assert d.image_pull_secrets == ("cluster-regcred", "other")
    assert d.env == {"NCCL_DEBUG": "INFO"}
    assert d.pod_labels == {"example.com/team": "platform"}
    assert d.pod_annotations == {"example.com/owner": "platform"}
    assert d.extended_resources == {"vpc.amazonaws.com/efa": 4}
    assert (d.ephemeral_storage, d.workspace_size) == ("100Gi", "90Gi")
    assert d.model_cache_claim == "shared-cache"
    assert ControllerSettings.from_env({}).render_defaults() == RenderDefaults()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KUBETUNE_TRAINER_ENV": '{"MASTER_ADDR": "x"}'},
         "KUBETUNE_TRAINER_ENV must not set MASTER_ADDR"),
        ({"KUBETUNE_TRAINER_ENV": "NCCL_DEBUG=INFO"}, "KUBETUNE_TRAINER_ENV must be a JSON object"),
        ({"KUBETUNE_TRAINER_POD_LABELS": '{"kubetune.io/job": "x"}'},
         "KUBETUNE_TRAINER_POD_LABELS key 'kubetune.io/job' uses the reserved"),
        ({"KUBETUNE_TRAINER_POD_ANNOTATIONS": '{"cdi.k8s.io/x": "nvidia.com/gpu=all"}'},
         "KUBETUNE_TRAINER_POD_ANNOTATIONS key 'cdi.k8s.io/x' is reserved"),
        ({"KUBETUNE_TRAINER_SERVICE_ACCOUNT": "Admin"},
         "KUBETUNE_TRAINER_SERVICE_ACCOUNT must be a ServiceAccount name"),
        ({"KUBETUNE_TRAINER_PRIORITY_CLASS": "x_y"}, "KUBETUNE_TRAINER_PRIORITY_CLASS"),
        ({"KUBETUNE_TRAINER_EXTENDED_RESOURCES": '{"cpu": 4}'},
         "KUBETUNE_TRAINER_EXTENDED_RESOURCES key 'cpu'"),
        ({"KUBETUNE_TRAINER_WORKSPACE_SIZE": "huge"},
         "KUBETUNE_TRAINER_WORKSPACE_SIZE must be a Kubernetes quantity"),
        ({"KUBETUNE_TRAINER_MODEL_CACHE_CLAIM": "Cache"},
         "KUBETUNE_TRAINER_MODEL_CACHE_CLAIM must be a PersistentVolumeClaim name"),
    ],
)
def test_bad_controller_defaults_stop_the_controller_naming_the_setting(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=None) as info:
        ControllerSettings.from_env(env)
    assert message in str(info.value)


def test_every_new_field_round_trips_through_the_wire() -> None:
    spec = make_spec(**EVERY_KNOB)
    assert FineTuneJobSpec.model_validate(spec.to_wire()) == spec
