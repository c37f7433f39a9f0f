"""spec.pod: what real clusters need on the trainer pods besides resources and placement.

Every field here is written by someone who may create FineTuneJobs and lands on pods that
the controller creates with its own rights, so each one is checked as hostile input: names
are Kubernetes names of bounded length, env names cannot shadow what kubetune or torchrun
set (nor hand the pod GPUs it was not allocated), and labels/annotations cannot collide with
the controller's own keys or switch off the container's confinement. Nothing here can add a
volume, a host path, a capability or a privileged container. Env may name keys of Secrets in
the job's namespace (valueFrom.secretKeyRef) like storage.credentialsSecret: the pods reference
them, the chart's admission policy requires that the job's creator may get each one, and the
controller holds the job (SecretMissing) until they exist.

Rules on plain fields are also CEL/schema rules (checked at `kubectl apply`); rules on map
keys (labels, annotations, extended resource names) are checked by pydantic only — a CEL rule
over unbounded map keys would blow the API server's cost budget — so the controller reports
them as an InvalidSpec condition.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import Field, field_validator, model_validator

from orchestrator.api.base import (
    DNS1123_SUBDOMAIN,
    MAX_NAME_LENGTH,
    ApiModel,
    cel,
    cel_rules,
)

MAX_ENV = 64
MAX_ENV_VALUE = 4096
# Env entries that may take their value from a Secret. The admission policy checks each one
# with the API server's authorizer, and a CEL expression may make only two authorizer calls
# (its per-call cost limit), so the policy has one rule per entry: this many
# (helm/kubetune/templates/admission-policy.yaml; tests/unit/test_helm_kustomize.py checks).
MAX_ENV_SECRET_REFS = 8
# A Secret data key (Kubernetes' IsConfigMapKey): '.' and '..' and names starting with '..'
# are refused by the API server too.
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
MAX_METADATA_ENTRIES = 32
# Image pull Secrets: checked by the admission policy like env Secret refs, one rule each.
MAX_PULL_SECRETS = 8
MAX_EXTENDED_RESOURCES = 16

# <vendor domain>/<name>, the grammar of extended resource names (resources.gpu uses it too).
EXTENDED_RESOURCE = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# Env names the pod's own machinery sets: torchrun/torch.distributed (from spec.distributed),
# the Job controller and render (config, identity), storage (from spec.storage) and the model
# cache (from spec.model.cacheClaim). NVIDIA_*/CUDA_VISIBLE_DEVICES would let a pod see GPUs
# the device plugin did not allocate to it.
RESERVED_ENV: tuple[str, ...] = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "JOB_COMPLETION_INDEX",
    "POD_NAME",
    "NODE_NAME",
    "HF_HOME",
    "PYTHONUNBUFFERED",
    "DS_ACCELERATOR",
    "CUDA_VISIBLE_DEVICES",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
)
RESERVED_ENV_PREFIXES: tuple[str, ...] = ("KUBETUNE_", "TORCHELASTIC_", "PET_", "NVIDIA_")

_ENV_RULE = (
    f"!(self.name in [{', '.join(repr(n) for n in RESERVED_ENV)}]) && "
    + " && ".join(f"!self.name.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES)
)
ENV_MESSAGE = (
    "pod.env must not set a variable kubetune owns (RANK, WORLD_SIZE, MASTER_ADDR and the "
    "other torchrun variables, HF_HOME, AWS credentials/endpoint/region, CUDA_VISIBLE_DEVICES, "
    "KUBETUNE_*, TORCHELASTIC_*, PET_*, NVIDIA_*): remove it"
)

# Label/annotation key: optional DNS-subdomain prefix + "/" + name (Kubernetes' qualified name).
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?)$")
_DNS_SUBDOMAIN = re.compile(DNS1123_SUBDOMAIN)
# Prefixes the controller, the Job controller and Kubernetes itself own on pod labels.
_RESERVED_LABEL_DOMAINS = ("kubetune.io", "kubernetes.io", "k8s.io")
# Annotation prefixes that the controller sets, that the Job controller sets, that inject
# devices (CDI) or that loosen confinement (AppArmor/seccomp).
_RESERVED_ANNOTATION_DOMAINS = (
    "kubetune.io",
    "kubectl.kubernetes.io",
    "batch.kubernetes.io",
    "cdi.k8s.io",
)
_SECURITY_ANNOTATION = re.compile(r"(^|\.)security\.(alpha|beta)\.kubernetes\.io$")
# Unprefixed annotation keys the container runtimes read (CRI-O, containerd, Kata).
_RUNTIME_ANNOTATION_PREFIXES = ("io.kubernetes.", "io.containerd.", "io.katacontainers.")


def _in_domain(prefix: str, domains: Iterable[str]) -> str | None:
    for d in domains:
        if prefix == d or prefix.endswith("." + d):
            return d
    return None


def _check_qualified_key(key: str, what: str) -> tuple[str, str]:
    """(prefix, name) of a label/annotation key, or ValueError naming ``what``."""
    prefix, _, name = key.rpartition("/")
    ok = (
        bool(name)
        and len(name) <= 63
        and _QUALIFIED_NAME.match(name) is not None
        and (not prefix or (len(prefix) <= 253 and _DNS_SUBDOMAIN.match(prefix) is not None))
    )
    if not ok:
        raise ValueError(
            f"{what} key {key!r} is not a valid Kubernetes key: use an optional DNS-subdomain "
            "prefix and a name of at most 63 letters, digits, '-', '_' or '.', e.g. "
            "example.com/team"
        )
    return prefix, name


def check_labels(labels: Mapping[str, str], what: str = "pod.labels") -> dict[str, str]:
    if len(labels) > MAX_METADATA_ENTRIES:
        raise ValueError(f"{what} has more than {MAX_METADATA_ENTRIES} entries")
    for key, value in labels.items():
        prefix, _ = _check_qualified_key(key, what)
        if (d := _in_domain(prefix, _RESERVED_LABEL_DOMAINS)) is not None:
            raise ValueError(
                f"{what} key {key!r} uses the reserved {d} prefix (the controller and "
                "Kubernetes set those labels, e.g. kubetune.io/job): use a prefix of your own, "
                "e.g. example.com/team"
            )
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            raise ValueError(
                f"{what}[{key!r}] value {value!r} is not a valid label value: at most 63 "
                "letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
            )
    return dict(labels)


def check_annotations(
    annotations: Mapping[str, str], what: str = "pod.annotations"
) -> dict[str, str]:
    if len(annotations) > MAX_METADATA_ENTRIES:
        raise ValueError(f"{what} has more than {MAX_METADATA_ENTRIES} entries")
    total = 0
    for key, value in annotations.items():
        prefix, name = _check_qualified_key(key, what)
        reserved = _in_domain(prefix, _RESERVED_ANNOTATION_DOMAINS)
        if reserved is None and _SECURITY_ANNOTATION.search(prefix):
            reserved = prefix
        if reserved is None and not prefix and name.startswith(_RUNTIME_ANNOTATION_PREFIXES):
            reserved = name
        if reserved is not None:
            raise ValueError(
                f"{what} key {key!r} is reserved ({reserved}: set by the controller or the Job "
                "controller, or read by the container runtime or security modules): remove it"
            )
        if not isinstance(value, str):
            raise ValueError(f"{what}[{key!r}] must be a string")
        total += len(key) + len(value)
    if total > 64 * 1024:
        raise ValueError(f"{what} are larger than 64 KiB in total: shorten them")
    return dict(annotations)


def check_name(value: str | None, what: str, kind: str) -> str | None:
    """``value`` if it is a valid name of a ``kind`` object (DNS-1123 subdomain)."""
    if value is not None and (len(value) > MAX_NAME_LENGTH or not _DNS_SUBDOMAIN.match(value)):
        raise ValueError(
            f"{what} must be a {kind} name (lowercase letters, digits, '-' and '.', at most "
            f"{MAX_NAME_LENGTH} characters), not {value!r}"
        )
    return value


def env_problem(name: str) -> str | None:
    """Why ``name`` may not be set through pod.env (None: it may)."""
    if not re.match(ENV_NAME, name):
        return "is not a valid variable name (letters, digits and '_', not starting with a digit)"
    if name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR",
                "MASTER_PORT", "NODE_RANK") or name.startswith(("TORCHELASTIC_", "PET_")):
        return "is set by torchrun from spec.distributed (nodes, gpusPerNode)"
    if name.startswith("AWS_") and name in RESERVED_ENV:
        return ("comes from spec.storage (endpoint, region, credentialsSecret) or the pod's "
                "service account (spec.pod.serviceAccountName)")
    if name == "HF_HOME":
        return "points at the model cache: set spec.model.cacheClaim to keep it on a volume"
    if name == "CUDA_VISIBLE_DEVICES" or name.startswith("NVIDIA_"):
        return ("would change which GPUs the pod sees: GPUs come from "
                "distributed.gpusPerNode through the device plugin")
    if name in RESERVED_ENV or name.startswith("KUBETUNE_"):
        return "is set by kubetune for the trainer"
    return None


def check_env_names(names: Iterable[str], what: str = "pod.env") -> None:
    seen: set[str] = set()
    for name in names:
        if (problem := env_problem(name)) is not None:
            raise ValueError(f"{what} must not set {name}: it {problem}; remove it")
        if name in seen:
            raise ValueError(f"{what} sets {name} twice: remove one")
        seen.add(name)


SECRET_KEY_MESSAGE = (
    "a Secret key is letters, digits, '-', '_' and '.' (at most 253, not '.' or '..' and not "
    "starting with '..'), e.g. api-key"
)
_SECRET_KEY_RULE = "self != '.' && self != '..' && !self.startsWith('..')"
_SECRET_KEY = re.compile(SECRET_KEY)


class SecretKeySelector(ApiModel):
    """A key of a Secret in the job's namespace (Kubernetes' secretKeyRef). The pods reference
    it and the kubelet reads it when a pod starts: its value is never copied into the
    FineTuneJob, the ConfigMap, logs or status. The Secret must exist when the job starts
    (else condition Valid=False, reason SecretMissing), and whoever creates the job must be
    allowed to get it (the chart's admission policy)."""

    name: str = Field(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        description="Secret name, e.g. wandb.",
        json_schema_extra={"pattern": DNS1123_SUBDOMAIN},
    )
    key: str = Field(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        description="Key in the Secret's data, e.g. api-key.",
        json_schema_extra={
            "pattern": SECRET_KEY,
            **cel_rules(cel(_SECRET_KEY_RULE, f"secretKeyRef.key: {SECRET_KEY_MESSAGE}")),
        },
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        check_name(value, "secretKeyRef.name", "Secret")
        return value

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        if (
            len(value) > MAX_NAME_LENGTH
            or not _SECRET_KEY.match(value)
            or value in (".", "..")
            or value.startswith("..")
        ):
            raise ValueError(f"secretKeyRef.key {value!r} is not valid: {SECRET_KEY_MESSAGE}")
        return value

    def to_k8s(self) -> dict[str, str]:
        return {"name": self.name, "key": self.key}


class EnvVarSource(ApiModel):
    """Where a variable's value comes from (Kubernetes' env[].valueFrom; only secretKeyRef)."""

    secret_key_ref: SecretKeySelector = Field(
        description="A key of a Secret in the job's namespace, e.g. {name: wandb, key: api-key}."
    )


ENV_VALUE_XOR_MESSAGE = (
    "pod.env: set either value (a literal) or valueFrom.secretKeyRef (a Secret key), not both"
)


class EnvVar(ApiModel):
    """One extra environment variable: a literal value or a Secret key (as in a pod spec)."""

    model_config = {
        "json_schema_extra": cel_rules(
            cel(_ENV_RULE, ENV_MESSAGE, ".name"),
            cel("!(has(self.value) && has(self.valueFrom))", ENV_VALUE_XOR_MESSAGE, ".valueFrom"),
        )
    }

    name: str = Field(
        min_length=1,
        max_length=128,
        description="Variable name, e.g. NCCL_SOCKET_IFNAME.",
        json_schema_extra={"pattern": ENV_NAME},
    )
    value: str | None = Field(
        default=None,
        max_length=MAX_ENV_VALUE,
        description="Literal value (no $(VAR) expansion); unset with valueFrom: empty.",
    )
    value_from: EnvVarSource | None = Field(
        default=None,
        description="Take the value from a key of a Secret in the job's namespace: "
        "{secretKeyRef: {name: wandb, key: api-key}}. The creator of the job must be allowed "
        "to get that Secret. Not with value.",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if (problem := env_problem(value)) is not None:
            raise ValueError(f"{ENV_MESSAGE} ({value} {problem})")
        return value

    @model_validator(mode="after")
    def _value_xor_value_from(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"{ENV_VALUE_XOR_MESSAGE} ({self.name} has both)")
        return self

    @property
    def secret_key_ref(self) -> SecretKeySelector | None:
        return self.value_from.secret_key_ref if self.value_from is not None else None

    def to_k8s(self) -> dict[str, Any]:
        return env_entry(self.name, self.secret_key_ref or self.value or "")


def env_entry(name: str, value: str | SecretKeySelector) -> dict[str, Any]:
    """A container env entry: a literal, or a reference the kubelet resolves (optional: false,
    so a missing Secret or key stops the container from starting instead of running without)."""
    if isinstance(value, SecretKeySelector):
        return {"name": name, "valueFrom": {"secretKeyRef": {**value.to_k8s(), "optional": False}}}
    # $(VAR) in a value would be expanded by the kubelet; $$ keeps it literal.
    return {"name": name, "value": value.replace("$(", "$$(")}


class LocalObjectReference(ApiModel):
    """A Secret in the job's namespace, by name."""

    name: str = Field(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        description="Secret name.",
        json_schema_extra={"pattern": DNS1123_SUBDOMAIN},
    )

    @field_validator("name")
    @classmethod
    def _check(cls, value: str) -> str:
        check_name(value, "pod.imagePullSecrets name", "Secret")
        return value


ENV_SECRET_REFS_MESSAGE = (
    f"pod.env may take at most {MAX_ENV_SECRET_REFS} variables from Secrets "
    "(valueFrom.secretKeyRef): the admission policy checks each one against the creator's "
    "rights"
)

PULL_SECRETS_MESSAGE = (
    f"pod.imagePullSecrets may name at most {MAX_PULL_SECRETS} Secrets: the admission policy "
    "checks each one against the creator's rights"
)

PRIORITY_MESSAGE = (
    "pod.priorityClassName must not name a system- priority class (reserved for cluster "
    "components): use one of your cluster's PriorityClasses for training"
)


class PodOptions(ApiModel):
    """Trainer pod identity, priority, image pull secrets, extra env and metadata. Unset
    fields take the controller's defaults (Helm values trainer.*); env, labels and
    annotations are merged with those defaults, the spec winning per key."""

    service_account_name: str | None = Field(
        default=None,
        max_length=MAX_NAME_LENGTH,
        description="ServiceAccount of the trainer pods, for cloud identity (EKS IRSA or Pod "
        "Identity, GKE Workload Identity, Azure Workload Identity) instead of static keys. "
        "Its Kubernetes API token is not mounted: the trainer never calls the API server, and "
        "the identity webhooks project their own tokens.",
        json_schema_extra={"pattern": DNS1123_SUBDOMAIN},
    )
    priority_class_name: str | None = Field(
        default=None,
        max_length=MAX_NAME_LENGTH,
        description="PriorityClass of the trainer pods (scheduling order and preemption).",
        json_schema_extra={
            "pattern": DNS1123_SUBDOMAIN,
            **cel_rules(cel("!self.startsWith('system-')", PRIORITY_MESSAGE)),
        },
    )
    # maxItems in the CRD (the API server's error names the field); here a validator, for the
    # message saying why
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list,
        description="Secrets for pulling the trainer image, e.g. [{name: regcred}]; added to "
        f"the controller's. At most {MAX_PULL_SECRETS}.",
        json_schema_extra={"maxItems": MAX_PULL_SECRETS},
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=MAX_ENV,
        description="Extra environment variables of the trainer container, e.g. "
        "{name: NCCL_DEBUG, value: WARN} or {name: WANDB_API_KEY, valueFrom: {secretKeyRef: "
        "{name: wandb, key: api-key}}} (a key of a Secret in the job's namespace, at most "
        f"{MAX_ENV_SECRET_REFS} such entries). Names kubetune or torchrun set are rejected.",
        json_schema_extra=cel_rules(
            cel(
                f"self.filter(e, has(e.valueFrom)).size() <= {MAX_ENV_SECRET_REFS}",
                ENV_SECRET_REFS_MESSAGE,
            )
        ),
    )
    annotations: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_METADATA_ENTRIES,
        description="Extra annotations on the trainer pods. kubetune.io/, kubectl.kubernetes.io/, "
        "batch.kubernetes.io/, cdi.k8s.io/, AppArmor/seccomp and container-runtime keys are "
        "rejected.",
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_METADATA_ENTRIES,
        description="Extra labels on the trainer pods. Keys under kubetune.io, kubernetes.io "
        "or k8s.io (the controller's and Kubernetes' own) are rejected.",
    )

    @field_validator("service_account_name")
    @classmethod
    def _check_service_account(cls, value: str | None) -> str | None:
        return check_name(value, "pod.serviceAccountName", "ServiceAccount")

    @field_validator("priority_class_name")
    @classmethod
    def _check_priority_class(cls, value: str | None) -> str | None:
        if check_name(value, "pod.priorityClassName", "PriorityClass") and str(value).startswith(
            "system-"
        ):
            raise ValueError(PRIORITY_MESSAGE)
        return value

    @field_validator("image_pull_secrets")
    @classmethod
    def _check_pull_secrets(cls, value: list[LocalObjectReference]) -> list[LocalObjectReference]:
        if len(value) > MAX_PULL_SECRETS:
            raise ValueError(f"{PULL_SECRETS_MESSAGE}, not {len(value)}")
        return value

    @field_validator("env")
    @classmethod
    def _check_env(cls, value: list[EnvVar]) -> list[EnvVar]:
        check_env_names(e.name for e in value)
        if sum(e.value_from is not None for e in value) > MAX_ENV_SECRET_REFS:
            raise ValueError(ENV_SECRET_REFS_MESSAGE)
        return value

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, value: dict[str, str]) -> dict[str, str]:
        return check_labels(value)

    @field_validator("annotations")
    @classmethod
    def _check_annotations(cls, value: dict[str, str]) -> dict[str, str]:
        return check_annotations(value)


def check_extended_resources(
    resources: Mapping[str, int], gpu: str | None, what: str = "resources.extendedResources"
) -> dict[str, int]:
    """Extended resources (vendor-domain names, whole numbers); not the GPU, not Kubernetes'
    own resources (cpu, memory, hugepages, ephemeral-storage have fields or are refused)."""
    if len(resources) > MAX_EXTENDED_RESOURCES:
        raise ValueError(f"{what} has more than {MAX_EXTENDED_RESOURCES} entries")
    for name, count in resources.items():
        if not re.match(EXTENDED_RESOURCE, name) or len(name) > 253:
            raise ValueError(
                f"{what} key {name!r} is not an extended resource name: use <vendor domain>/"
                "<name>, e.g. vpc.amazonaws.com/efa (cpu, memory and ephemeral-storage have "
                "their own resources fields)"
            )
        domain = name.split("/", 1)[0]
        if domain == "kubernetes.io" or domain.endswith(".kubernetes.io"):
            raise ValueError(
                f"{what} key {name!r} is in the kubernetes.io domain, which extended "
                "resources may not use: use the device plugin's own name"
            )
        if gpu is not None and name == gpu:
            raise ValueError(
                f"{what} must not request {name}: the GPU count is distributed.gpusPerNode"
            )
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 4096:
            raise ValueError(f"{what}[{name!r}] must be a whole number from 1 to 4096")
    return dict(resources)
