"""The controller checks that the Secrets a job's pods will read exist, and nothing more: the
API server answers it with the Secret's metadata only, so user credentials never reach the
controller's memory (the most privileged pod of the cluster reads no user secret)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.controller.kube import Kube
from tests.support import Cluster

pytestmark = pytest.mark.cluster


def test_secret_presence_is_checked_without_reading_the_data(
    cluster: Cluster, namespace: str, k8s: Any
) -> None:
    cluster.kubectl("create", "secret", "generic", "wandb", "-n", namespace,
                    "--from-literal=api-key=do-not-read-me")
    kube = Kube(k8s, secret_ttl=0.0)
    bodies: list[dict[str, Any]] = []
    read = kube.core.read_namespaced_secret

    def recording(*args: Any, **kwargs: Any) -> Any:
        resp = read(*args, **kwargs)
        bodies.append(json.loads(resp.data))
        return resp

    kube.core.read_namespaced_secret = recording
    assert kube.secret_exists(namespace, "wandb")
    assert not kube.secret_exists(namespace, "missing")
    (body,) = bodies  # the missing one raised 404 inside the client
    assert body["kind"] == "PartialObjectMetadata" and body["metadata"]["name"] == "wandb"
    assert "data" not in body and "do-not-read-me" not in json.dumps(body)
