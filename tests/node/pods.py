"""Running pods on the real node: manifests pinned to it (node selector + toleration of its
taint, local images only) and waits on what the real kubelet reports."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tests.support import Cluster, wait_for

NODE_LABEL = "kubetune.io/real-node"


@dataclass
class RealNode:
    cluster: Cluster
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.env["REAL_NODE"]

    def image(self, which: str) -> str:
        return self.env[f"{which.upper()}_IMAGE"]

    def pod(
        self,
        name: str,
        image: str,
        *,
        command: list[str] | None = None,
        args: list[str] | None = None,
        labels: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        **spec: Any,
    ) -> dict[str, Any]:
        """A pod manifest that can only run on the real node, from a local image."""
        container: dict[str, Any] = {"name": "main", "image": image, "imagePullPolicy": "Never"}
        if command is not None:
            container["command"] = command
        if args is not None:
            container["args"] = args
        if env:
            container["env"] = [{"name": k, "value": v} for k, v in env.items()]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {
                "restartPolicy": "Never",
                "nodeSelector": {NODE_LABEL: "true"},
                "tolerations": [{"key": NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
                "terminationGracePeriodSeconds": 2,
                "containers": [container],
                **spec,
            },
        }

    def apply(self, namespace: str, *objects: dict[str, Any]) -> None:
        doc = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
        self.cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        out = self.cluster.kubectl("get", "pod", "-n", namespace, name, "-o", "json").stdout
        return dict(json.loads(out))

    def wait_finished(self, namespace: str, name: str, timeout: float = 180) -> dict[str, Any]:
        """Waits until the pod Succeeded or Failed and returns it; a container stuck waiting
        (image missing, config error) fails fast with the kubelet's reason."""

        def done() -> dict[str, Any] | None:
            pod = self.get_pod(namespace, name)
            for cs in pod["status"].get("containerStatuses", []):
                waiting = cs.get("state", {}).get("waiting", {})
                if waiting.get("reason") in {"ErrImageNeverPull", "CreateContainerConfigError"}:
                    raise AssertionError(f"pod {name} cannot start: {waiting}")
            return pod if pod["status"].get("phase") in {"Succeeded", "Failed"} else None

        return wait_for(done, timeout=timeout, interval=0.5, what=f"pod {namespace}/{name} to end")

    def wait_running(self, namespace: str, name: str, timeout: float = 120) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            pod = self.get_pod(namespace, name)
            return pod if pod["status"].get("phase") == "Running" else None

        return wait_for(running, timeout=timeout, interval=0.3, what=f"pod {name} Running")

    def wait_service_ready(self, namespace: str, service: str, timeout: float = 60) -> None:
        """Waits until an EndpointSlice of the Service lists a ready endpoint: what kube-proxy
        programs its rules from (a Running pod may not be Ready yet)."""

        def ready() -> bool:
            out = self.cluster.kubectl(
                "get", "endpointslices", "-n", namespace,
                "-l", f"kubernetes.io/service-name={service}", "-o", "json",
            ).stdout
            return any(
                ep.get("conditions", {}).get("ready")
                for item in json.loads(out)["items"]
                for ep in item.get("endpoints") or []
            )

        wait_for(ready, timeout=timeout, interval=0.3, what=f"service {service} endpoint ready")

    def logs(self, namespace: str, name: str) -> str:
        return self.cluster.kubectl("logs", "-n", namespace, name).stdout


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    """The main container's terminated state as the kubelet wrote it."""
    statuses = pod["status"]["containerStatuses"]
    return dict(statuses[0]["state"]["terminated"])
