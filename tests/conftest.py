"""Session fixtures: the real control plane, a namespace per test, the S3 server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.support import (
    REPORT,
    Cluster,
    S3Bucket,
    S3Server,
    start_cluster,
    start_s3,
    stop_cluster,
    versions,
    wait_for,
)

# Tools (DeepSpeed, HF) must never try to reach a hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_report_header(config: pytest.Config) -> list[str]:
    v = versions()
    cold = os.path.expanduser("~/.cache/kubetune/testbin/.cold-build-seconds")
    lines = ["kubetune test components: " + ", ".join(f"{k}={val}" for k, val in v.items())]
    if os.path.exists(cold):
        with open(cold) as f:
            lines.append(f"testbin cold build took {f.read().strip()}s")
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("kubetune environment")
        for key, value in REPORT.items():
            terminalreporter.write_line(f"{key}: {value}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    version = c.kubectl("version", "-o", "json", check=False).stdout
    REPORT["kubectl version"] = " ".join(version.split())
    try:
        yield c
    finally:
        stop_cluster(c)


@pytest.fixture(scope="session")
def k8s(cluster: Cluster):  # type: ignore[no-untyped-def]
    """A kubernetes ApiClient for the test cluster (admin credentials)."""
    from kubernetes import config

    return config.new_client_from_config(config_file=cluster.kubeconfig)


@pytest.fixture
def namespace(cluster: Cluster, k8s) -> Iterator[str]:  # type: ignore[no-untyped-def]
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(k8s)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    # The default ServiceAccount appears asynchronously; pods need it.
    wait_for(
        lambda: core.read_namespaced_service_account("default", name),
        timeout=30,
        what="default ServiceAccount",
    )
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_s3()
    REPORT["s3"] = f"moto S3 server at {server.endpoint}"
    try:
        yield server
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)


@pytest.fixture
def s3(s3_server: S3Server) -> S3Bucket:
    """A fresh bucket on the real S3-compatible server (plain S3 over HTTP)."""
    bucket = S3Bucket(
        s3_server.endpoint,
        s3_server.access_key,
        s3_server.secret_key,
        s3_server.region,
        f"kt-{uuid.uuid4().hex[:10]}",
    )
    bucket.client().create_bucket(Bucket=bucket.bucket)
    return bucket
