"""Pure builders: FineTuneJob spec -> ConfigMap, headless Service, Indexed batch/v1 Job.

Restart policy: the Job has `backoffLimit: 0`. A torch job cannot continue with a dead rank,
so any failed pod fails the whole Job and the controller starts the next attempt as a new
Job (`<job>-a<n+1>`) that resumes from the latest checkpoint, up to spec.backoffLimit. Node
disruptions (preemption, eviction, node drain: pod condition DisruptionTarget) fail the Job at
once through the podFailurePolicy (FailJob): a static torch gang cannot take one replaced rank
back, so the survivors are stopped instead of waiting in a collective until a timeout. The
controller then restarts the whole gang without using one of the user's retries.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.api import labels as L
from orchestrator.api.job import FineTuneJobSpec
from orchestrator.api.pod import SecretKeySelector, env_entry
from orchestrator.api.trainer_config import (
    CONFIG_FILE,
    CONFIG_MOUNT_DIR,
    CONFIG_PATH,
    DEEPSPEED_FILE,
    MODEL_CACHE_DIR,
    MODEL_CACHE_ENV,
    PVC_MOUNT_ROOT,
    WORKDIR,
    ProgressRef,
    SweepTrialRef,
    TrainerConfig,
)
from orchestrator.render.deepspeed import render_deepspeed_config
from orchestrator.render.defaults import RenderDefaults
from orchestrator.render.names import (
    RENDEZVOUS_PORT,
    child_names,
    object_meta,
    selector_labels,
)

CONTAINER_NAME = "trainer"
TERMINATION_LOG = "/dev/termination-log"
ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
_DEFAULTS = RenderDefaults()


def resolve_spec(spec: FineTuneJobSpec, defaults: RenderDefaults = _DEFAULTS) -> FineTuneJobSpec:
    """The spec with the controller's defaults (image, storage) filled where it has none."""
    storage = spec.storage.model_copy(
        update={
            "endpoint": spec.storage.endpoint or defaults.storage_endpoint,
            "credentials_secret": spec.storage.credentials_secret or defaults.credentials_secret,
            "region": spec.storage.region or defaults.region,
        }
    )
    return spec.model_copy(update={"storage": storage, "image": spec.image or defaults.image})


@dataclass(frozen=True)
class SecretRef:
    """A Secret the trainer pods will reference, and which field names it (for messages)."""

    secret: str
    field: str  # e.g. spec.storage.credentialsSecret, spec.pod.env[WANDB_API_KEY]
    keys: tuple[str, ...]  # the keys the pods read


def secret_refs(spec: FineTuneJobSpec, defaults: RenderDefaults = _DEFAULTS) -> list[SecretRef]:
    """Every Secret the pods of ``spec`` read (credentials, env), in render order: the
    controller checks that they exist before it creates anything."""
    refs: list[SecretRef] = []
    if spec.storage.credentials_secret:
        refs.append(SecretRef(spec.storage.credentials_secret, "spec.storage.credentialsSecret",
                              (ACCESS_KEY_ENV, SECRET_KEY_ENV)))
    elif defaults.credentials_secret:
        refs.append(SecretRef(defaults.credentials_secret,
                              "spec.storage.credentialsSecret, the controller's default",
                              (ACCESS_KEY_ENV, SECRET_KEY_ENV)))
    own = {e.name: e.secret_key_ref for e in spec.pod.env}
    for name, value in _merged(defaults.env, own).items():
        if isinstance(value, SecretKeySelector):
            where = (f"spec.pod.env[{name}].valueFrom.secretKeyRef" if name in own
                     else f"env {name}, the controller's default (trainer.env)")
            refs.append(SecretRef(value.name, where, (value.key,)))
    return refs


def _with_sweep_labels(
    job_meta: Mapping[str, Any], sweep: SweepTrialRef | None
) -> Mapping[str, Any]:
    """Trial children carry kubetune.io/sweep and kubetune.io/trial even when the caller
    passes only the SweepTrialRef."""
    if sweep is None:
        return job_meta
    labels = dict(job_meta.get("labels") or {})
    labels.setdefault(L.LABEL_SWEEP, sweep.name)
    labels.setdefault(L.LABEL_TRIAL, str(sweep.trial_number))
    return {**job_meta, "labels": labels}


def render_trainer_config(
    job_meta: Mapping[str, Any],
    spec: FineTuneJobSpec,
    attempt: int,
    defaults: RenderDefaults = _DEFAULTS,
    sweep: SweepTrialRef | None = None,
    progress: ProgressRef | None = None,
) -> TrainerConfig:
    """The resolved TrainerConfig the pod reads from /etc/kubetune/config.json."""
    resolved = resolve_spec(spec, defaults)
    return TrainerConfig(
        job_name=str(job_meta["name"]),
        namespace=str(job_meta["namespace"]),
        spec=resolved,
        deepspeed=render_deepspeed_config(resolved),
        attempt=attempt,
        sweep=sweep,
        progress=progress,
    )


def config_hash(config: TrainerConfig) -> str:
    """Short digest of the trainer config; lets the controller spot a changed spec."""
    return hashlib.sha256(config.to_json(indent=None).encode()).hexdigest()[:16]


def render_configmap(
    job_meta: Mapping[str, Any],
    spec: FineTuneJobSpec,
    attempt: int,
    defaults: RenderDefaults = _DEFAULTS,
    sweep: SweepTrialRef | None = None,
    progress: ProgressRef | None = None,
) -> dict[str, Any]:
    """ConfigMap with config.json (TrainerConfig) and ds_config.json (DeepSpeed)."""
    job_meta = _with_sweep_labels(job_meta, sweep)
    config = render_trainer_config(job_meta, spec, attempt, defaults, sweep, progress)
    names = child_names(str(job_meta["name"]), attempt)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(
            job_meta,
            names.configmap,
            L.COMPONENT_CONFIG,
            attempt,
            annotations={L.ANNOTATION_SPEC_HASH: config_hash(config)},
        ),
        "data": {
            CONFIG_FILE: config.to_json() + "\n",
            DEEPSPEED_FILE: json.dumps(config.deepspeed, indent=2, sort_keys=True) + "\n",
        },
    }


def render_service(
    job_meta: Mapping[str, Any],
    spec: FineTuneJobSpec | None = None,
    sweep: SweepTrialRef | None = None,
) -> dict[str, Any]:
    """Headless Service giving each pod a stable DNS name; pod 0 hosts the rendezvous.

    publishNotReadyAddresses: the DNS records must exist before the pods are Ready, since
    torchrun connects to pod 0 while every pod is still starting."""
    job_meta = _with_sweep_labels(job_meta, sweep)
    name = str(job_meta["name"])
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(job_meta, child_names(name, 1).service, L.COMPONENT_RENDEZVOUS),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(name),
            "ports": [
                {
                    "name": "rdzv",
                    "port": RENDEZVOUS_PORT,
                    "targetPort": RENDEZVOUS_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def _pvc_claims(spec: FineTuneJobSpec) -> dict[str, bool]:
    """PVC claim -> writable, for every pvc:// URI in the spec (output needs writes)."""
    claims: dict[str, bool] = {}
    d = spec.data
    replay = d.replay.uri if d.replay is not None else None
    inputs = [spec.model.uri, *d.train_uris, d.eval, d.general, replay]
    for uri in inputs:
        if uri and uri.startswith("pvc://"):
            claims.setdefault(uri[len("pvc://") :].split("/", 1)[0], False)
    if spec.output.uri.startswith("pvc://"):
        claims[spec.output.uri[len("pvc://") :].split("/", 1)[0]] = True
    return dict(sorted(claims.items()))


def _model_cache_claim(spec: FineTuneJobSpec, defaults: RenderDefaults) -> str | None:
    return spec.model.cache_claim or defaults.model_cache_claim


def _merged(defaults: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """The controller's defaults with the spec's entries over them (spec wins per key)."""
    return {**defaults, **own}


def _env(
    job_meta: Mapping[str, Any],
    spec: FineTuneJobSpec,
    attempt: int,
    sweep: SweepTrialRef | None,
    defaults: RenderDefaults = _DEFAULTS,
    progress: ProgressRef | None = None,
) -> list[dict[str, Any]]:
    def field_ref(path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": path}}

    # With a model cache volume the Hub cache (hf:// models) lives on it, else in the scratch.
    cached = _model_cache_claim(spec, defaults) is not None
    cache_root = MODEL_CACHE_DIR if cached else f"{WORKDIR}/.cache"

    env: list[dict[str, Any]] = [
        # Also injected by the Job controller; declared so that $(JOB_COMPLETION_INDEX) in
        # the args expands and the env is complete for anyone replaying it.
        {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": field_ref(
                "metadata.annotations['batch.kubernetes.io/job-completion-index']"
            ),
        },
        {"name": "KUBETUNE_CONFIG", "value": CONFIG_PATH},
        {"name": "KUBETUNE_JOB", "value": str(job_meta["name"])},
        {"name": "KUBETUNE_NAMESPACE", "value": str(job_meta["namespace"])},
        {"name": "KUBETUNE_ATTEMPT", "value": str(attempt)},
        {"name": "KUBETUNE_WORKDIR", "value": WORKDIR},
        {"name": "POD_NAME", "valueFrom": field_ref("metadata.name")},
        {"name": "NODE_NAME", "valueFrom": field_ref("spec.nodeName")},
        {"name": "HF_HOME", "value": f"{cache_root}/huggingface"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if cached:
        # the trainer downloads s3:// models there too (orchestrator/trainer/run.py)
        env.append({"name": MODEL_CACHE_ENV, "value": MODEL_CACHE_DIR})
    if spec.distributed.gpus_per_node == 0:
        # CPU pods: DeepSpeed must not go looking for an accelerator (and fail without one).
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    storage = spec.storage
    if storage.endpoint:
        # The S3-only variable: a generic AWS_ENDPOINT_URL would also redirect STS (IRSA).
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": storage.endpoint})
    if storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": storage.region})
    if storage.credentials_secret:
        # referenced, never copied: the kubelet resolves the Secret when the pod starts
        for key in (ACCESS_KEY_ENV, SECRET_KEY_ENV):
            env.append(
                {
                    "name": key,
                    "valueFrom": {"secretKeyRef": {"name": storage.credentials_secret, "key": key}},
                }
            )
    # HMACs derived in the controller's memory (no Secret in the namespace): a trial's token
    # posts intermediate values for that trial only, a job's token progress for that job.
    tokens = {}
    if progress is not None and progress.token:
        tokens[progress.token_env] = progress.token
    if sweep is not None and sweep.token:
        tokens[sweep.token_env] = sweep.token
    env.extend({"name": k, "value": v} for k, v in tokens.items())
    # Extra env last: the names were checked not to shadow any of the above (api/pod.py).
    # Secret keys are referenced like the credentials: the kubelet reads them, nothing copies.
    extra = _merged(defaults.env, {e.name: e.secret_key_ref or e.value or "" for e in spec.pod.env})
    env.extend(env_entry(k, v) for k, v in extra.items())
    return env


def torchrun_command(job_name: str, spec: FineTuneJobSpec, attempt: int) -> list[str]:
    """torchrun with a static rendezvous on pod 0; node rank = the pod's completion index."""
    d = spec.distributed
    names = child_names(job_name, attempt)
    return [
        "torchrun",
        f"--nnodes={d.nodes}",
        f"--nproc-per-node={d.processes_per_node}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={names.master_addr}",
        f"--master-port={RENDEZVOUS_PORT}",
        # how long pod 0's store waits for every node (static rendezvous), then the attempt fails
        f"--rdzv-conf=timeout={d.rendezvous_timeout_seconds}",
        "-m",
        "orchestrator.trainer",
        "--config",
        CONFIG_PATH,
    ]


def _resources(spec: FineTuneJobSpec, defaults: RenderDefaults = _DEFAULTS) -> dict[str, Any]:
    r = spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    gpus = spec.distributed.gpus_per_node
    if gpus:
        # extended resources must have requests == limits
        requests[r.gpu] = limits[r.gpu] = str(gpus)
    if r.cpu:
        requests["cpu"] = r.cpu  # no CPU limit: throttling stalls the data loaders and NCCL
    if r.memory:
        requests["memory"] = limits["memory"] = r.memory
    ephemeral = r.ephemeral_storage or defaults.ephemeral_storage
    if ephemeral:
        requests["ephemeral-storage"] = ephemeral  # a request: the workspace sizeLimit caps it
    extended = _merged(defaults.extended_resources, r.extended_resources)
    for name, count in sorted(extended.items()):
        if name != r.gpu:  # the GPU count is distributed.gpusPerNode's
            requests[name] = limits[name] = str(count)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def render_job(
    job_meta: Mapping[str, Any],
    spec: FineTuneJobSpec,
    attempt: int,
    defaults: RenderDefaults = _DEFAULTS,
    sweep: SweepTrialRef | None = None,
    progress: ProgressRef | None = None,
) -> dict[str, Any]:
    """Indexed batch/v1 Job: one pod per node, completions = parallelism = nodes."""
    spec = resolve_spec(spec, defaults)
    job_meta = _with_sweep_labels(job_meta, sweep)
    name = str(job_meta["name"])
    names = child_names(name, attempt)
    nodes = spec.distributed.nodes
    config = render_trainer_config(job_meta, spec, attempt, defaults, sweep, progress)

    job_labels: dict[str, str] = {}
    if spec.queue_name:
        job_labels[L.LABEL_KUEUE_QUEUE] = spec.queue_name

    workspace_size = spec.resources.workspace_size or defaults.workspace_size
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": names.configmap}},
        {
            "name": "dshm",
            "emptyDir": {
                "medium": "Memory",
                **({"sizeLimit": spec.resources.shm_size} if spec.resources.shm_size else {}),
            },
        },
        {"name": "workspace", "emptyDir": {"sizeLimit": workspace_size} if workspace_size else {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_MOUNT_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "workspace", "mountPath": WORKDIR},
    ]
    for i, (claim, writable) in enumerate(_pvc_claims(spec).items()):
        volumes.append(
            {
                "name": f"pvc-{i}",
                "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable},
            }
        )
        mounts.append(
            {"name": f"pvc-{i}", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": not writable}
        )
    if cache_claim := _model_cache_claim(spec, defaults):
        volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": cache_claim}})
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_DIR})

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        # args, not command: the image's entrypoint (tini + kubetune-train) wraps torchrun and
        # turns the trainer's termination message back into its documented exit code
        "args": torchrun_command(name, spec, attempt),
        "env": _env(job_meta, spec, attempt, sweep, defaults, progress),
        "ports": [{"name": "rdzv", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}],
        "resources": _resources(spec, defaults),
        "volumeMounts": mounts,
        "workingDir": WORKDIR,
        # the trainer writes its final metrics (JSON) here; the controller copies them into
        # status.metrics. On a crash the log tail explains the failure instead.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
    }
    if defaults.image_pull_policy:
        container["imagePullPolicy"] = defaults.image_pull_policy

    pod_spec: dict[str, Any] = {
        "subdomain": names.service,  # with the Indexed Job's hostname: <job>-<i>.<service>
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        # Never true, even with pod.serviceAccountName: the trainer never talks to the API
        # server, and cloud identity (IRSA, EKS Pod Identity, GKE/Azure Workload Identity)
        # comes from the identity webhook's own projected token or the metadata server.
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": defaults.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": defaults.run_as_user,
            "runAsGroup": defaults.run_as_user,
            "fsGroup": defaults.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    pod = spec.pod
    if service_account := pod.service_account_name or defaults.service_account:
        pod_spec["serviceAccountName"] = service_account
    if priority_class := pod.priority_class_name or defaults.priority_class:
        pod_spec["priorityClassName"] = priority_class
    pull_secrets = dict.fromkeys([*defaults.image_pull_secrets,
                                  *(s.name for s in pod.image_pull_secrets)])
    if pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in pull_secrets]
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [t.to_wire() for t in spec.resources.tolerations]
    if spec.resources.affinity:
        pod_spec["affinity"] = spec.resources.affinity

    # the controller's own labels and annotations win (user keys were checked not to collide)
    pod_labels = {
        **_merged(defaults.pod_labels, pod.labels),
        **object_meta(job_meta, names.job, L.COMPONENT_TRAINER, attempt)["labels"],
    }
    pod_annotations = {
        **_merged(defaults.pod_annotations, pod.annotations),
        "kubectl.kubernetes.io/default-container": CONTAINER_NAME,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(
            job_meta,
            names.job,
            L.COMPONENT_TRAINER,
            attempt,
            extra_labels=job_labels,
            annotations={L.ANNOTATION_SPEC_HASH: config_hash(config)},
        ),
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": 0,  # gang restarts are the controller's (see module docstring)
            "podReplacementPolicy": "Failed",  # never two pods with one host name
            "podFailurePolicy": {
                "rules": [
                    {
                        # the controller restarts the gang; see the module docstring
                        "action": "FailJob",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    }
                ]
            },
            # Kueue admits queued Jobs by unsuspending them
            "suspend": bool(spec.suspend or spec.queue_name),
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": pod_annotations,
                },
                "spec": pod_spec,
            },
        },
    }


def render_all(
    job_meta: Mapping[str, Any],
    spec: FineTuneJobSpec,
    attempt: int,
    defaults: RenderDefaults = _DEFAULTS,
    sweep: SweepTrialRef | None = None,
    progress: ProgressRef | None = None,
) -> list[dict[str, Any]]:
    """Every child for an attempt, in creation order: ConfigMap, Service, Job."""
    return [
        render_configmap(job_meta, spec, attempt, defaults, sweep, progress),
        render_service(job_meta, spec, sweep),
        render_job(job_meta, spec, attempt, defaults, sweep, progress),
    ]
