"""Helpers shared by every test tier: waiting, the test cluster and the S3 server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
TESTBIN = Path(os.environ.get("KUBETUNE_TESTBIN", Path.home() / ".cache/kubetune/testbin"))

T = TypeVar("T")

# Timings and versions collected during the session, printed in the terminal summary.
REPORT: dict[str, str] = {}


def wait_for(
    predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.2, what: str = ""
) -> T:
    """Polls `predicate` until it returns a truthy value and returns that value.

    Raises TimeoutError naming `what` and the last value or exception seen.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except Exception as exc:  # the condition may raise while objects converge
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout}s waiting for {what or predicate}: {last!r}"
            )
        time.sleep(interval)


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (TOOLS / "versions.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def tool(name: str) -> str:
    """Absolute path of a test binary (built by `make testbin`)."""
    path = TESTBIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found in {TESTBIN}; run `make testbin`")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    kubeconfig: str
    started_here: bool

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, as_user: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [tool("kubectl"), "--kubeconfig", self.kubeconfig]
        if as_user:
            cmd += ["--as", as_user]
        proc = subprocess.run(
            [*cmd, *args], input=input, capture_output=True, text=True, timeout=120
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc


def start_cluster() -> Cluster:
    """Reuses the cluster KUBECONFIG points at if it answers, else starts one."""
    env_kc = os.environ.get("KUBECONFIG")
    if env_kc and Path(env_kc).exists():
        probe = subprocess.run(
            [tool("kubectl"), "--kubeconfig", env_kc, "get", "--raw", "/readyz"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if probe.returncode == 0:
            REPORT["cluster"] = f"reused the cluster at {env_kc}"
            return Cluster(env_kc, started_here=False)
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(TOOLS / "cluster.sh"), "up"], capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cluster start failed:\n{proc.stderr[-4000:]}")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("KUBECONFIG="), last
    # A cluster that was already running belongs to whoever started it (another test
    # session, a developer's `make cluster-up`): this session must not stop it.
    reused = "reusing it" in proc.stderr
    REPORT["cluster"] = (
        "reused the running test cluster"
        if reused
        else f"warm cluster start {time.monotonic() - t0:.1f}s"
    )
    return Cluster(last.split("=", 1)[1], started_here=not reused)


def stop_cluster(cluster: Cluster) -> None:
    if cluster.started_here and not os.environ.get("KUBETUNE_KEEP_CLUSTER"):
        subprocess.run([str(TOOLS / "cluster.sh"), "down"], capture_output=True, timeout=300)


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str
    process: subprocess.Popen[bytes]


@dataclass
class S3Bucket:
    endpoint: str
    access_key: str
    secret_key: str
    region: str
    bucket: str

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def env(self) -> dict[str, str]:
        """The environment a trainer pod would get from the credentials Secret."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
        }


def start_s3() -> S3Server:
    """moto's standalone S3-compatible server as a separate process on loopback."""
    import sys

    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(up, timeout=30, what="moto S3 server")
    return S3Server(endpoint, "kubetune-test", "kubetune-test-secret", "us-east-1", proc)
