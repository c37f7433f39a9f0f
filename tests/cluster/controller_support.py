"""Runs the real controller as a local process against the test cluster, authenticated as
its ServiceAccount (a real token with exactly the RBAC of the deploy manifests), so a
missing permission fails a test the way it would fail in a cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from tests.support import REPO, Cluster, free_port, wait_for

CONTROLLER_NS = "kubetune-system"
CONTROLLER_SA = "kubetune-controller"


def sa_kubeconfig(cluster: Cluster, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates with a fresh token of `namespace/sa`."""
    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration", "24h").stdout
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    ctx_name = admin["current-context"]
    ctx = next(c["context"] for c in admin["contexts"] if c["name"] == ctx_name)
    clus = next(c for c in admin["clusters"] if c["name"] == ctx["cluster"])
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [clus],
        "users": [{"name": sa, "user": {"token": token.strip()}}],
        "contexts": [{"name": sa, "context": {"cluster": clus["name"], "user": sa}}],
        "current-context": sa,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


class ControllerProcess:
    # Every controller process of this test session that may be running (tests that need the
    # cluster to themselves stop them, see test_leader_election.py).
    live: ClassVar[list[ControllerProcess]] = []

    def __init__(self, kubeconfig: Path, workdir: Path, extra_env: dict[str, str] | None = None):
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.metrics_port = free_port()
        self.report_port = free_port()
        self.liveness_port = free_port()
        self.report_url = f"http://127.0.0.1:{self.report_port}/report"
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "controller.log"
        self.starts = 0

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "KUBECONFIG": str(self.kubeconfig),
                "KUBETUNE_LEADER_ELECTION": "true",
                "KUBETUNE_LEASE_NAMESPACE": CONTROLLER_NS,
                "KUBETUNE_METRICS_PORT": str(self.metrics_port),
                "KUBETUNE_REPORT_PORT": str(self.report_port),
                "KUBETUNE_REPORT_URL": self.report_url,
                "KUBETUNE_STUDY_STORAGE": f"sqlite:///{self.workdir}/optuna.db",
                "KUBETUNE_RESYNC_SECONDS": "3",
                "KUBETUNE_TRAINER_IMAGE": "registry.example/kubetune/trainer:test",
                # chart defaults for jobs that leave spec.storage out
                "KUBETUNE_S3_ENDPOINT": "http://s3.storage:8333",
                "KUBETUNE_S3_CREDENTIALS_SECRET": "s3-credentials",
                "POD_NAME": f"controller-{self.starts}",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, wait: bool = True) -> None:
        """Starts the process; with `wait`, returns once it leads (its liveness endpoint
        answers only after the Lease is held), else at once (a standby)."""
        self.starts += 1
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator.controller",
                f"--liveness=http://127.0.0.1:{self.liveness_port}/healthz",
                "--log-format",
                "plain",
            ],
            cwd=REPO,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if self not in ControllerProcess.live:
            ControllerProcess.live.append(self)
        if not wait:
            return
        # ready once kopf's liveness endpoint answers: leadership held, watches running
        import urllib.request

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited: {self.tail()}")
            try:
                urllib.request.urlopen(
                    f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=1
                ).read()
                return True
            except OSError:
                return False

        wait_for(up, timeout=60, what="controller up")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no lease release — the worst case."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM: a clean shutdown, which hands the Lease over."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def end_pod(cluster: Cluster, namespace: str, pod: str, code: int, message: Any = "") -> None:
    """Play the kubelet: the trainer container of `pod` exits with `code` and `message`."""
    msg = message if isinstance(message, str) else json.dumps(message, separators=(",", ":"))
    cluster.kubectl(
        "annotate",
        "pod",
        "-n",
        namespace,
        pod,
        "--overwrite",
        f"kubetune.io/test-exit-code={code}",
        f"kubetune.io/test-message={msg}",
    )


def get(cluster: Cluster, kind: str, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)


def items(cluster: Cluster, kind: str, namespace: str, selector: str = "") -> list[dict[str, Any]]:
    args = ["get", kind, "-n", namespace, "-o", "json"]
    if selector:
        args += ["-l", selector]
    return json.loads(cluster.kubectl(*args).stdout)["items"]


def wait_phase(
    cluster: Cluster, kind: str, namespace: str, name: str, phase: str, timeout: float = 60
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = get(cluster, kind, namespace, name)
        return obj if (obj.get("status") or {}).get("phase") == phase else None

    return wait_for(check, timeout=timeout, what=f"{kind}/{name} phase {phase}")


def trainer_metrics(
    eval_loss: float,
    percent: float = 0.5,
    artifact: str = "s3://adapters/test/job/",
    **extra: Any,
) -> dict[str, Any]:
    """A termination message shaped like the real trainer's (orchestrator.trainer.artifact).
    The controller records `artifact` only under `<spec.output.uri>/<job name>/`."""
    return {
        "format": "kubetune.trainer/v1",
        "status": "Succeeded",
        "exitCode": 0,
        "reason": "Succeeded",
        "message": "",
        "metrics": {
            "evalLoss": eval_loss,
            "trainableParamPercent": percent,
            "trainableParams": 1000,
            **extra,
        },
        "artifact": {"uri": artifact, "sha256": "0" * 64},
    }


def wait_ready_with_time(fn: Any, timeout: float) -> float:
    t0 = time.monotonic()
    wait_for(fn, timeout=timeout)
    return time.monotonic() - t0


# --- A cluster without other controllers ------------------------------------------------


def _kubetune_leases(cluster: Cluster) -> dict[str, str]:
    """Every held kubetune Lease in the cluster (any release, any namespace), by version."""
    docs = json.loads(cluster.kubectl("get", "leases", "-A", "-o", "json").stdout)
    return {f"{d['metadata']['namespace']}/{d['metadata']['name']}":
            d["metadata"]["resourceVersion"] for d in docs["items"]
            if "kubetune" in d["metadata"]["name"]
            and (d.get("spec") or {}).get("holderIdentity")}


def _wait_other_controllers_quiet(cluster: Cluster) -> None:
    """The test cluster is shared: a cluster-wide controller of another test session (the
    cluster tier's process, the node tier's Helm release) would reconcile this test's jobs
    too. Wait until no kubetune Lease is being renewed."""

    def quiet() -> bool:
        first = _kubetune_leases(cluster)
        if not first:
            return True
        time.sleep(6)  # longer than any renew period (5 s before leader.py's rewrite)
        again = _kubetune_leases(cluster)
        return not any(again.get(k) not in (None, v) for k, v in first.items())

    try:
        wait_for(quiet, timeout=90, what="no other kubetune controller")
    except TimeoutError:
        # A cluster this session started holds only this session's controllers: one still
        # renewing its Lease here is a defect, not a reason to skip (CI is always this case).
        if cluster.started_here:
            raise
        pytest.skip("another kubetune controller (not started by this test session) is "
                    "active on the shared test cluster; it would reconcile this test's jobs")


@pytest.fixture
def cluster_to_ourselves(cluster: Cluster, crds: None) -> Iterator[None]:
    """Stops this session's controller processes (and waits out any other kubetune
    controller on the cluster) for a test that runs its own controller, restarting them
    after. Import it into the test module and use `pytest.mark.usefixtures`."""
    stopped = [p for p in ControllerProcess.live if p.running()]
    for proc in stopped:
        proc.stop()  # SIGTERM: releases the Lease
    try:
        _wait_other_controllers_quiet(cluster)
        yield
    finally:
        for proc in stopped:
            proc.start()
