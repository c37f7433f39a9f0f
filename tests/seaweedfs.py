"""SeaweedFS (`weed server`, built from its Go module by tools/build-testbin.sh) as an
S3-compatible server on loopback, for the storage tests and bench/storage_throughput.py.

Unlike moto it keeps objects on disk and serves them from Go, so a test can SIGKILL it in the
middle of a transfer, start it again on the same ports and data directory, and find every
object still there; and a benchmark measures the client rather than the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTBIN = Path(os.environ.get("KUBETUNE_TESTBIN", Path.home() / ".cache/kubetune/testbin"))
ACCESS_KEY = "kubetune-test"
SECRET_KEY = "kubetune-test-secret"
REGION = "us-east-1"


def weed_binary() -> Path | None:
    path = TESTBIN / "weed"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class SeaweedFS:
    """One `weed server` (master + volume + filer + S3 gateway) bound to 127.0.0.1."""

    data_dir: Path
    binary: Path
    ports: list[int] = field(default_factory=lambda: _free_ports(8))
    process: subprocess.Popen[bytes] | None = None
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[6]}"

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.data_dir / "s3.json"
        cfg.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "kubetune",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = self.ports
        args = [
            str(self.binary),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data_dir}",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.peers=none",  # one master: no election to wait for after a restart
            "-master.volumeSizeLimitMB=1024",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.max=0",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.data_dir}/filer.sock",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.config={cfg}",
            "-s3.port.iceberg=0",  # extra listeners on fixed ports: off
            "-s3.port.lance=0",
            "-volume.preStopSeconds=0",  # stop() at once
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self._wait_ready(timeout)
        return self

    def reclaim(self) -> None:
        """Compact every volume now, so deleted and overwritten objects free their disk (a
        benchmark that uploads the same GiB key again and again would otherwise fill it)."""
        import urllib.request

        url = f"http://127.0.0.1:{self.ports[0]}/vol/vacuum?garbageThreshold=0.0001"
        with urllib.request.urlopen(url, timeout=300) as r:
            r.read()

    def _wait_ready(self, timeout: float) -> None:
        """Ready when the S3 gateway can create (or already has) a bucket, i.e. the filer
        and a volume are up behind it."""
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
        )
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                break
            try:
                client.put_object(Bucket=self._probe_bucket(client), Key=".ready", Body=b"1")
                return
            except Exception as exc:
                last = exc
                time.sleep(0.3)
        tail = (self.data_dir / "weed.log").read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready ({last}):\n{tail}")

    @staticmethod
    def _probe_bucket(client: object) -> str:
        try:
            client.create_bucket(Bucket="kubetune-ready")  # type: ignore[attr-defined]
        except Exception as exc:
            if "BucketAlreadyOwnedByYou" not in str(exc) and "BucketAlreadyExists" not in str(exc):
                raise
        return "kubetune-ready"

    def kill(self) -> None:
        """SIGKILL the whole server (no clean shutdown), as a crashed node would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)  # nothing to keep: don't wait for a clean exit
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)

    def restart(self, timeout: float = 60.0) -> None:
        """Start again on the same ports and data directory: objects survive."""
        self.kill()
        self.start(timeout)

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )


def serve(data_dir: Path, bucket: str) -> Iterator[SeaweedFS]:
    """A started server with ``bucket`` for a module-scoped fixture; stopped afterwards."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("weed not found in the testbin; run `make testbin`")
    server = SeaweedFS(data_dir, binary).start()
    server.client().create_bucket(Bucket=bucket)
    try:
        yield server
    finally:
        server.stop()


def s3_config(server: Any, **over: Any) -> Any:
    """The S3Config that reaches a test server (SeaweedFS or moto: endpoint, region, keys)."""
    from orchestrator.storage import S3Config

    base: dict[str, Any] = {
        "endpoint_url": server.endpoint,
        "region": server.region,
        "access_key_id": server.access_key,
        "secret_access_key": server.secret_key,
    }
    return S3Config(**{**base, **over})


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()
