"""Helpers for the deployment tests (Helm chart, kustomize) and for tests that run the
controller with exactly the chart's permissions.

Controller tests use them like this::

    user = install_rbac(cluster, namespace)             # the chart's RBAC, serving `namespace`
    kubeconfig = service_account_kubeconfig(cluster, namespace, user, tmp_path / "kc")
    env = {**os.environ, **chart_controller_env(namespace), "KUBECONFIG": str(kubeconfig)}
    # run `python -m orchestrator.controller` with env; a missing verb now fails the test
    ...
    remove_rbac(cluster, namespace)                     # cluster-scoped leftovers

`kubectl --as=<user>` works as well (impersonation); a kubeconfig with the ServiceAccount's
own token is for clients that cannot impersonate (kopf).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support import REPO, Cluster, tool

CHART = REPO / "helm" / "kubetune"
MANIFESTS = REPO / "manifests"
RBAC_TEMPLATES = ("templates/serviceaccount.yaml", "templates/rbac.yaml")
# The controller's default Lease name (ControllerSettings.lease_name). install_rbac grants
# the leader-election Role on this name so a controller run with default settings can lead.
DEFAULT_LEASE = "kubetune-controller"
# Likewise the report master key Secret (ControllerSettings.report_key_secret).
DEFAULT_REPORT_KEY = "kubetune-report-key"

_HELM_HOME: str | None = None


def _helm_env(kubeconfig: str | None) -> dict[str, str]:
    """Helm keeps caches, config and plugins under HOME: give it a private one so tests never
    read or write the user's Helm setup."""
    global _HELM_HOME
    if _HELM_HOME is None:
        _HELM_HOME = tempfile.mkdtemp(prefix="kubetune-helm-home-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    env["HOME"] = _HELM_HOME
    env.pop("KUBECONFIG", None)
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    return env


def helm(
    *args: str, cluster: Cluster | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Runs the test helm binary; with `cluster`, against the test cluster."""
    proc = subprocess.run(
        [tool("helm"), *args], capture_output=True, text=True, timeout=timeout,
        env=_helm_env(cluster.kubeconfig if cluster else None), cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stderr.strip()}\n{proc.stdout[-2000:]}")
    return proc


def set_args(values: dict[str, Any] | None) -> list[str]:
    """`--set-json key=<json>` for each value: exact types, lists and objects included."""
    out: list[str] = []
    for key, value in (values or {}).items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


def render(
    release: str = "kubetune",
    namespace: str = "kubetune-system",
    values: dict[str, Any] | None = None,
    show_only: Iterable[str] = (),
    extra: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """`helm template` of the chart (no CRDs), parsed."""
    args = ["template", release, str(CHART), "--namespace", namespace, *set_args(values)]
    for path in show_only:
        args += ["--show-only", path]
    text = helm(*args, *extra).stdout
    return [d for d in yaml.safe_load_all(text) if d]


def kubectl_json(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


# --- RBAC for controller tests --------------------------------------------------------------


def release_for(namespace: str) -> str:
    # Contains "kubetune", so resource names are "<release>-controller" and the
    # cluster-scoped ones stay unique per test namespace.
    return f"kubetune-{namespace}"


def install_rbac(
    cluster: Cluster,
    namespace: str,
    *,
    watch_namespaces: Sequence[str] | None = None,
    cluster_wide: bool = False,
    release: str | None = None,
) -> str:
    """Applies the chart's ServiceAccount and RBAC (rendered by `helm template --show-only`)
    as if the chart were installed into `namespace`, and returns the ServiceAccount's user
    name (`system:serviceaccount:<namespace>:<name>`) for `--as` or a token.

    By default the controller may serve `namespace` only (the chart's default, or
    `watch_namespaces`); `cluster_wide=True` renders the chart's `clusterWide: true`
    ClusterRole instead. The
    leader-election Role covers the Lease `kubetune-controller` in `namespace`: run the
    controller with KUBETUNE_LEASE_NAMESPACE=<namespace> (see `chart_controller_env`).
    Cluster-scoped objects are named after `namespace`; `remove_rbac` deletes them.
    """
    watch = [] if cluster_wide else list(watch_namespaces or [namespace])
    docs = render(
        release or release_for(namespace), namespace,
        values={"clusterWide": cluster_wide, "watchNamespaces": watch,
                "leaderElection.leaseName": DEFAULT_LEASE, "report.keySecret": DEFAULT_REPORT_KEY},
        show_only=RBAC_TEMPLATES,
    )
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    return f"system:serviceaccount:{namespace}:{sa}"


def remove_rbac(cluster: Cluster, namespace: str, *, release: str | None = None) -> None:
    """Deletes the cluster-scoped RBAC objects install_rbac created (namespaced ones go with
    the namespace)."""
    name = f"{release or release_for(namespace)}-controller"
    cluster.kubectl("delete", "clusterrolebinding,clusterrole", name, "--ignore-not-found",
                    "--wait=false", check=False)


def chart_controller_env(
    namespace: str,
    values: dict[str, Any] | None = None,
    *,
    release: str | None = None,
    pod_name: str = "kubetune-controller-local",
) -> dict[str, str]:
    """The controller's environment exactly as the chart's Deployment sets it, for a chart
    installed in `namespace` with `values` (default: the chart's, watching `namespace` only,
    and the Lease that install_rbac allows). Downward-API values are filled in and `$(VAR)`
    references expanded the way the kubelet does."""
    merged = {"leaderElection.leaseName": DEFAULT_LEASE,
              "report.keySecret": DEFAULT_REPORT_KEY, **(values or {})}
    docs = render(release or release_for(namespace), namespace, values=merged,
                  show_only=["templates/deployment.yaml"])
    container = docs[0]["spec"]["template"]["spec"]["containers"][0]
    fields = {"metadata.name": pod_name, "metadata.namespace": namespace}
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            value = str(item["value"])
            for key, resolved in env.items():
                value = value.replace(f"$({key})", resolved)
            env[item["name"]] = value
        elif "fieldRef" in item.get("valueFrom", {}):
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def service_account_kubeconfig(
    cluster: Cluster, namespace: str, user: str, dest: Path, duration: str = "2h"
) -> Path:
    """Writes a kubeconfig that authenticates as the ServiceAccount `user` with its own
    token (TokenRequest API), for clients that cannot impersonate."""
    prefix = f"system:serviceaccount:{namespace}:"
    assert user.startswith(prefix), user
    token = cluster.kubectl("create", "token", user[len(prefix):], "-n", namespace,
                            f"--duration={duration}").stdout.strip()
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    ctx = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    server = next(c for c in admin["clusters"] if c["name"] == ctx["cluster"])
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [server],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": server["name"], "user": user,
                                                "namespace": namespace}}],
        "current-context": "sa",
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(config))
    dest.chmod(0o600)
    return dest


# --- Comparing permissions --------------------------------------------------------------------

Permission = tuple[str, str, str]  # (resource[.group], resourceNames, verb)


def rule_permissions(rules: Iterable[dict[str, Any]]) -> set[Permission]:
    """Expands RBAC rules into (resource.group, resourceNames, verb) triples, the form
    `kubectl auth can-i --list` prints, so rules written differently compare equal."""
    out: set[Permission] = set()
    for rule in rules:
        names = ",".join(sorted(rule.get("resourceNames") or []))
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                # kubectl prints "finetunejobs.kubetune.io/status" for a subresource.
                base, _, sub = resource.partition("/")
                qualified = f"{base}.{group}" if group else base
                if sub:
                    qualified += f"/{sub}"
                for verb in rule.get("verbs", []):
                    out.add((qualified, names, verb))
    return out


def can_i_list(cluster: Cluster, user: str, namespace: str) -> set[Permission]:
    """What `kubectl auth can-i --list --as=<user> -n <namespace>` reports, as triples
    (non-resource URLs left out: they come from the built-in discovery roles)."""
    out = cluster.kubectl("auth", "can-i", "--list", f"--as={user}", "-n", namespace).stdout
    lines = out.splitlines()
    header = lines[0]
    starts = [header.index(col) for col in
              ("Resources", "Non-Resource URLs", "Resource Names", "Verbs")]
    perms: set[Permission] = set()
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        resource, _, names, verbs = cells
        if not resource:
            continue
        names = ",".join(sorted(names.strip("[]").split()))
        for verb in verbs.strip("[]").split():
            perms.add((resource, names, verb))
    return perms


def granted(cluster: Cluster, user: str, namespace: str) -> set[Permission]:
    """can_i_list minus what every authenticated user may do anyway (self-reviews), measured
    with a ServiceAccount that has no bindings."""
    baseline = can_i_list(cluster, f"system:serviceaccount:{namespace}:kubetune-nobody",
                          namespace)
    return can_i_list(cluster, user, namespace) - baseline


# --- Cluster fixtures' building blocks --------------------------------------------------------


def prebound_volume(cluster: Cluster, namespace: str, claim: str, size: str = "1Gi") -> str:
    """A PersistentVolume reserved for `namespace/claim`: the test cluster has no volume
    provisioner, and the chart's default study claim must bind for `helm install --wait`."""
    name = f"{namespace}-{claim}"[:63]
    pv = {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"kubetune.io/test-volume": namespace}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": f"/tmp/kubetune-test-volumes/{name}"},
            "claimRef": {"namespace": namespace, "name": claim},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pv))
    return name


def delete_test_volumes(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("delete", "pv", "-l", f"kubetune.io/test-volume={namespace}",
                    "--ignore-not-found", "--wait=false", check=False)


def finetunejob(name: str) -> dict[str, Any]:
    """A small valid FineTuneJob (nothing needs to run it)."""
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://models/tiny-llama"},
            "data": {"train": "s3://datasets/support/train.jsonl",
                     "eval": "s3://datasets/support/eval.jsonl"},
            "method": {"type": "lora", "rank": 8},
            "output": {"uri": f"s3://adapters/{name}/"},
        },
    }
