"""Node-tier fixtures: the real kubelet node of the test cluster (tools/node.sh), its S3
endpoint on the pod bridge, and helpers to run pods from the project's own images there."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator import storage
from tests.cluster.test_cli_cluster import credentials
from tests.node.pods import RealNode
from tests.support import REPORT, TOOLS, Cluster, S3Bucket
from tests.trainer import helpers


def _node_env(cluster: Cluster) -> dict[str, str]:
    out = subprocess.run(
        [str(TOOLS / "cluster.sh"), "env"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="session")
def real_node(cluster: Cluster) -> Iterator[RealNode]:
    """The real node joined to the test cluster; started here (and stopped at the end) when
    the cluster came up without it. Its images are built by `make images`."""
    up = subprocess.run(
        [str(TOOLS / "node.sh"), "up", cluster.kubeconfig],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if up.returncode != 0:
        raise RuntimeError(f"real node start failed:\n{up.stderr[-4000:]}")
    started = [line for line in up.stderr.splitlines() if "Ready in" in line]
    if started:
        REPORT["real node"] = started[-1]
    node = RealNode(cluster, _node_env(cluster))
    REPORT["kubectl get nodes -o wide"] = (
        "\n" + cluster.kubectl("get", "nodes", "-o", "wide").stdout
    )
    yield node
    if started and not cluster.started_here:
        subprocess.run([str(TOOLS / "node.sh"), "down"], capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def node_controller(cluster: Cluster, real_node: RealNode) -> Iterator[str]:
    """The controller installed by the Helm chart as a pod on the real node, from
    kubetune/controller:dev; trainer pods from kubetune/trainer:dev. Yields its namespace."""
    from tests.cluster.deploy_helpers import CHART, helm, set_args

    # Its own release and namespace: the cluster tier leaves the kustomize base's
    # ServiceAccount and ClusterRole (kubetune-controller) behind, which Helm will not adopt.
    release, namespace = "kt-node", "kt-node-system"
    toleration = {"key": "kubetune.io/real-node", "operator": "Exists", "effect": "NoSchedule"}
    image, tag = real_node.image("controller").rsplit(":", 1)
    values = {
        "image.repository": image,
        "image.tag": tag,
        "image.pullPolicy": "Never",
        "trainer.image": real_node.image("trainer"),
        # every test has its own namespace: serve them all (the chart's default is the
        # release namespace only)
        "clusterWide": True,
        # trainer pod defaults travel Helm values -> controller settings -> every trainer pod
        "trainer.env": {"NCCL_DEBUG": "WARN"},
        "trainer.podLabels": {"team": "node-tier"},
        "objectStorage.endpoint": real_node.env["S3_ENDPOINT"],
        "objectStorage.credentialsSecret": "s3-credentials",
        "objectStorage.region": "us-east-1",
        "studyStorage.persistence.enabled": False,
        "nodeSelector": {"kubetune.io/real-node": "true"},
        "tolerations": [toleration],
        "resyncSeconds": 10,
        # live progress from trainer pods every 2 s (status.progress: at most every 30 s)
        "extraEnv": [{"name": "KUBETUNE_PROGRESS_SECONDS", "value": "2"}],
        # the chart's admission policy is in force for every node-tier job: they tolerate
        # the real node's taint, and the default image list is trainer.image
        "admissionPolicy.allowedTolerationKeys": ["nvidia.com/gpu", "kubetune.io/real-node"],
        # test_pod_failures names an image that does not exist, on purpose
        "admissionPolicy.allowedImages": [real_node.image("trainer"),
                                          "kubetune/does-not-exist:dev"],
    }
    helm(
        "upgrade",
        "--install",
        release,
        str(CHART),
        "-n",
        namespace,
        "--create-namespace",
        *set_args(values),
        "--wait",
        "--timeout",
        "240s",
        cluster=cluster,
        timeout=300,
    )
    try:
        yield namespace
    finally:
        logs = cluster.kubectl(
            "logs",
            "-n",
            namespace,
            "-l",
            f"app.kubernetes.io/instance={release}",
            "--tail=200",
            check=False,
        ).stdout
        REPORT["controller pod log tail"] = "\n" + logs[-6000:]
        helm("uninstall", release, "-n", namespace, "--wait", cluster=cluster, check=False)


# Per module: test_real_node restarts the node, and with it the in-memory S3 server.
@pytest.fixture(scope="module")
def inputs(
    real_node: RealNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A tiny Llama and its data in a bucket of the node's S3 server."""
    env = real_node.env
    bucket = f"kt-node-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    s3 = S3Bucket(
        env["S3_ENDPOINT_HOST"],
        env["AWS_ACCESS_KEY_ID"],
        env["AWS_SECRET_ACCESS_KEY"],
        "us-east-1",
        bucket,
    )
    s3.client().create_bucket(Bucket=bucket)
    config = storage.S3Config(
        endpoint_url=s3.endpoint,
        region=s3.region,
        access_key_id=s3.access_key,
        secret_access_key=s3.secret_key,
    )
    root = tmp_path_factory.mktemp("node-inputs")
    tok = root / "tok"
    helpers.build_tokenizer(tok)
    model = helpers.build_model(root / "llama", "llama", tok)
    records = helpers.corpus(96, 1)
    helpers.write_jsonl(root / "train.jsonl", records[:80])
    helpers.write_jsonl(root / "eval.jsonl", records[80:])
    b = f"s3://{bucket}"
    storage.upload_dir(model, f"{b}/models/llama", s3=config, progress=False)
    for name in ("train.jsonl", "eval.jsonl"):
        storage.upload_file(root / name, f"{b}/data/{name}", s3=config, progress=False)
    yield {"s3": s3, "bucket": bucket, "model_dir": model}


@pytest.fixture
def job_ns(cluster: Cluster, node_controller: str, namespace: str, inputs: dict[str, Any]) -> str:
    """A namespace with the credentials Secret the controller's default names, while the
    Helm-installed controller pod runs."""
    credentials(cluster, namespace, inputs["s3"])
    return namespace
