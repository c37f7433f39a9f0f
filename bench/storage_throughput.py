"""Storage throughput: kubetune's storage API against the fastest S3 clients we know.

SeaweedFS (built from its Go module by tools/build-testbin.sh, bound to 127.0.0.1, data in a
temp dir) is the server. Four cases -- download one large file, download a directory of many
small files, and the same two uploads -- run for each client, interleaved (the order rotates
every rep, so machine noise hits all alike), and the medians are compared:

- ``kubetune``: the storage API of this checkout as the trainer image runs it
  (``KUBETUNE_S3_ENGINE=s5cmd``: s5cmd moves the bytes of downloads, kubetune verifies every
  file against the manifest's or the object's xxh3t before placing it; uploads hash every
  file, sha256 and xxh3t in one read, and write the manifest);
- ``kubetune-python``: the same with the Python download engine (no s5cmd binary);
- ``kubetune@REF`` with ``--ref REF``: the storage package of an older commit, the "before" (with
  ``KUBETUNE_S3_ENGINE=s5cmd``, as the image sets it; commits before that engine ignore it);
- ``boto3-default``: one s3transfer TransferManager with boto3's defaults, no verification;
- ``boto3-tuned``: the same with 64 MiB parts and 32 threads;
- ``s5cmd``: built from its Go module (``s5cmd cp``), no verification.

Each Python client runs in its own long-lived worker process (imports stay out of the
timings; its CPU seconds and peak RSS are its own); s5cmd runs as a child per transfer.
The JSON has, per case and client, the median MiB/s, client CPU seconds, and
``ratio_to_fastest``; plus the load average seen.

    python bench/storage_throughput.py [--size-mib 1024] [--files 200] [--file-mib 2]
        [--reps 5] [--ref 5c4cb61] [--out bench-storage.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.seaweedfs import TESTBIN, SeaweedFS, weed_binary  # noqa: E402

MiB = 1 << 20
BUCKET = "bench"
CASES = ("download_file", "download_dir", "upload_file", "upload_dir")


# ---- worker side (runs in a child process) ------------------------------------------------
def _worker(kind: str, endpoint: str, key: str, secret: str) -> None:
    """Read one JSON command per line from stdin, run it, print one JSON result line."""
    os.environ.update(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret, AWS_REGION="us-east-1")
    if ref_path := os.environ.get("KT_BENCH_REF_PATH"):
        sys.path.insert(0, ref_path)  # the older storage package shadows this checkout's
    run = _make_runner(kind, endpoint)
    mod = sys.modules.get("orchestrator.storage")
    print(json.dumps({"ready": True, "module": getattr(mod, "__file__", None)}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        r0, t0 = _cpu(), time.perf_counter()
        extra = run(cmd["case"], cmd["local"], cmd["prefix"]) or {}
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        cpu = _cpu() - r0  # the worker's own and its children's (s5cmd)
        out = {"seconds": t1 - t0, "cpu": cpu, "maxrss_mib": r1.ru_maxrss / 1024, **extra}
        print(json.dumps(out), flush=True)


def _cpu() -> float:
    return sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF),
                  resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def _make_runner(kind: str, endpoint: str) -> Any:
    if kind.startswith("kubetune"):
        from orchestrator.storage import S3Config, S3Store

        os.environ["KUBETUNE_S5CMD"] = str(TESTBIN / "s5cmd")
        # An older commit (kind@REF) as the trainer image runs it: the image's engine setting
        # by environment (a commit from before the s5cmd engine ignores it: its Python path).
        os.environ["KUBETUNE_S3_ENGINE"] = "s5cmd"
        engine = {} if "@" in kind else {
            "engine": "python" if kind == "kubetune-python" else "s5cmd"}
        store = S3Store(BUCKET, S3Config(endpoint_url=endpoint, **engine), progress=False)

        def run_kt(case: str, local: str, prefix: str) -> dict[str, Any]:
            if case == "download_file":
                store.download_file(prefix, local)
            elif case == "download_dir":
                store.download_dir(prefix, local, require_manifest=True)
            elif case == "upload_file":
                store.upload_file(local, prefix)
            else:
                store.upload_dir(local, prefix)
            stats = getattr(store, "stats", None)
            return {"peak_buffered_mib": stats.peak_buffered / MiB} if stats else {}

        return run_kt

    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
    from s3transfer.manager import TransferManager

    if kind == "boto3-tuned":
        cfg = TransferConfig(
            multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB, max_concurrency=32
        )
        pool = 40
    else:
        cfg, pool = TransferConfig(), 10
    client = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=pool))
    manager = TransferManager(client, cfg)

    def run_boto(case: str, local: str, prefix: str) -> None:
        if case == "download_file":
            manager.download(BUCKET, prefix, local).result()
        elif case == "upload_file":
            manager.upload(local, BUCKET, prefix).result()
        elif case == "download_dir":
            keys = [
                o["Key"]
                for page in client.get_paginator("list_objects_v2").paginate(
                    Bucket=BUCKET, Prefix=prefix + "/"
                )
                for o in page.get("Contents", [])
            ]
            futures = []
            for k in keys:
                dest = Path(local) / k[len(prefix) + 1 :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                futures.append(manager.download(BUCKET, k, str(dest)))
            for f in futures:
                f.result()
        else:
            futures = [
                manager.upload(str(p), BUCKET, f"{prefix}/{p.relative_to(local).as_posix()}")
                for p in sorted(Path(local).rglob("*"))
                if p.is_file()
            ]
            for f in futures:
                f.result()

    return run_boto


# ---- driver side --------------------------------------------------------------------------
class Worker:
    def __init__(self, kind: str, weed: SeaweedFS, pythonpath: str | None) -> None:
        env = dict(os.environ)
        if pythonpath:
            env["KT_BENCH_REF_PATH"] = pythonpath
        self.kind = kind
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                kind,
                weed.endpoint,
                weed.access_key,
                weed.secret_key,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        hello = json.loads(self._read())
        assert hello["ready"]
        if hello.get("module"):
            print(f"{kind}: {hello['module']}", file=sys.stderr)

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.kind} died (exit {self.proc.wait()})")
        return line

    def run(self, case: str, local: str, prefix: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"case": case, "local": local, "prefix": prefix}) + "\n")
        self.proc.stdin.flush()
        return dict(json.loads(self._read()))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def s5cmd_run(weed: SeaweedFS, case: str, local: str, prefix: str) -> dict[str, Any]:
    exe = TESTBIN / "s5cmd"
    src_dst = {
        "download_file": [f"s3://{BUCKET}/{prefix}", local],
        "download_dir": [f"s3://{BUCKET}/{prefix}/*", local + "/"],
        "upload_file": [local, f"s3://{BUCKET}/{prefix}"],
        "upload_dir": [local + "/", f"s3://{BUCKET}/{prefix}/"],
    }[case]
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": weed.access_key,
        "AWS_SECRET_ACCESS_KEY": weed.secret_key,
        "AWS_REGION": weed.region,
    }
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(
        [str(exe), "--endpoint-url", weed.endpoint, "cp", *src_dst],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"seconds": t1 - t0, "cpu": cpu}


def ensure_s5cmd() -> Path:
    """s5cmd from the testbin (`make testbin` builds it: the trainer image's download engine);
    built here from tools/s5cmd at the version pinned in tools/versions.env when missing."""
    exe = TESTBIN / "s5cmd"
    stamp = TESTBIN / ".s5cmd.version"
    version = next(
        line.split("=", 1)[1].strip()
        for line in (REPO / "tools" / "versions.env").read_text().splitlines()
        if line.startswith("S5CMD_VERSION=")
    )
    if exe.is_file() and stamp.is_file() and stamp.read_text().strip() == version:
        return exe
    print(f"building s5cmd {version} into {TESTBIN} ...", file=sys.stderr)
    TESTBIN.mkdir(parents=True, exist_ok=True)
    ldflags = f"-s -w -X github.com/peak/s5cmd/v2/version.Version={version}"
    subprocess.run(
        ["go", "build", "-ldflags", ldflags, "-o", str(exe) + ".tmp", "github.com/peak/s5cmd/v2"],
        cwd=REPO / "tools" / "s5cmd",
        env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod -trimpath"},
        check=True,
    )
    os.replace(str(exe) + ".tmp", exe)
    stamp.write_text(version + "\n")
    return exe


def checkout_ref(ref: str, into: Path) -> str:
    """The storage package of an older commit, importable on its own (PYTHONPATH)."""
    data = subprocess.run(
        [
            "git",
            "-C",
            str(REPO),
            "archive",
            ref,
            "orchestrator/__init__.py",
            "orchestrator/storage",
        ],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return str(into)


def make_data(root: Path, size_mib: int, files: int, file_mib: int) -> tuple[Path, Path]:
    big = root / "src" / "big.bin"
    big.parent.mkdir(parents=True)
    with open(big, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MiB))
    small = root / "src" / "dir"
    small.mkdir()
    for i in range(files):
        (small / f"shard-{i:04d}.bin").write_bytes(os.urandom(file_mib * MiB))
    return big, small


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--file-mib", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ref", default=None, help="also measure kubetune's storage at this commit")
    ap.add_argument(
        "--clients", default="kubetune,kubetune-python,boto3-default,boto3-tuned,s5cmd"
    )
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--tmp", default=None, help="where data and the server live (default: TMPDIR)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    binary = weed_binary()
    if binary is None:
        sys.exit(f"weed is needed in {TESTBIN}: run tools/build-testbin.sh")
    clients = args.clients.split(",")
    if args.ref:
        clients.insert(1, f"kubetune@{args.ref}")
    cases = args.cases.split(",")
    ensure_s5cmd()  # the yardstick, and kubetune's download engine

    root = Path(tempfile.mkdtemp(prefix="kt-bench-storage-", dir=args.tmp))
    weed = SeaweedFS(root / "weed", binary)
    workers: dict[str, Worker] = {}
    try:
        t0 = time.monotonic()
        big, small = make_data(root, args.size_mib, args.files, args.file_mib)
        weed.start()
        weed.client().create_bucket(Bucket=BUCKET)
        print(f"data + server ready in {time.monotonic() - t0:.0f}s", file=sys.stderr)
        for c in clients:
            if c == "s5cmd":
                continue
            path = checkout_ref(c.split("@", 1)[1], root / "ref") if "@" in c else None
            workers[c] = Worker(c, weed, path)
        # The objects every client downloads, written by kubetune (checksum metadata, manifest);
        # an older commit reads its own upload (its own manifest format), the same bytes.
        sources = {c: f"src-{c.split('@', 1)[1]}" if "@" in c else "src" for c in clients}
        seeders = {"src": "kubetune", **{src: c for c, src in sources.items() if src != "src"}}
        for src, c in seeders.items():
            workers[c].run("upload_file", str(big), f"{src}/big.bin")
            workers[c].run("upload_dir", str(small), f"{src}/dir")
            # SeaweedFS serves an object it has just written slowly once (seen: 2.7 s instead
            # of 1.0 for 1 GiB, whoever reads first): one untimed read before the reps.
            for case, name in (("download_file", "big.bin"), ("download_dir", "dir")):
                warm = root / "warm"
                (warm / "dir").mkdir(parents=True)
                s5cmd_run(weed, case, str(warm / name), f"{src}/{name}")
                shutil.rmtree(warm)

        results: dict[str, dict[str, list[dict[str, Any]]]] = {
            case: {c: [] for c in clients} for case in cases
        }
        loads: list[float] = []
        for rep in range(args.reps):
            order = clients[rep % len(clients) :] + clients[: rep % len(clients)]
            for case in cases:
                for c in order:
                    dest = root / "dst" / c
                    shutil.rmtree(dest, ignore_errors=True)
                    dest.mkdir(parents=True)
                    local, prefix = {
                        "download_file": (str(dest / "big.bin"), f"{sources[c]}/big.bin"),
                        "download_dir": (str(dest / "dir"), f"{sources[c]}/dir"),
                        "upload_file": (str(big), f"up/{c}/big.bin"),
                        "upload_dir": (str(small), f"up/{c}/dir"),
                    }[case]
                    loads.append(os.getloadavg()[0])
                    if c == "s5cmd":
                        if case == "download_dir":
                            Path(local).mkdir()
                        r = s5cmd_run(weed, case, local, prefix)
                    else:
                        r = workers[c].run(case, local, prefix)
                    nbytes = (
                        args.size_mib * MiB
                        if case.endswith("file")
                        else args.files * args.file_mib * MiB
                    )
                    r["mib_s"] = nbytes / MiB / r["seconds"]
                    results[case][c].append(r)
                    print(
                        f"rep {rep} {case:13s} {c:22s} {r['mib_s']:7.1f} MiB/s "
                        f"cpu {r['cpu']:5.2f}s load {loads[-1]:.1f}",
                        file=sys.stderr,
                    )
                    shutil.rmtree(dest, ignore_errors=True)
                    if case.startswith("upload"):  # free the server's disk for the next rep
                        s3 = weed.client()
                        for page in s3.get_paginator("list_objects_v2").paginate(
                            Bucket=BUCKET, Prefix=f"up/{c}/"
                        ):
                            for o in page.get("Contents", []):
                                s3.delete_object(Bucket=BUCKET, Key=o["Key"])
                        weed.reclaim()

        summary: dict[str, Any] = {}
        for case in cases:
            med = {c: statistics.median(r["mib_s"] for r in results[case][c]) for c in clients}
            fastest = max(v for c, v in med.items() if not c.startswith("kubetune"))
            summary[case] = {
                c: {
                    "mib_s": round(med[c], 1),
                    "cpu_s": round(statistics.median(r["cpu"] for r in results[case][c]), 2),
                    "ratio_to_fastest": round(med[c] / fastest, 2),
                    **(
                        {
                            "peak_buffered_mib": max(
                                r.get("peak_buffered_mib", 0) for r in results[case][c]
                            ),
                            "maxrss_mib": round(max(r["maxrss_mib"] for r in results[case][c])),
                        }
                        if c.startswith("kubetune")
                        else {}
                    ),
                    "runs_mib_s": [round(r["mib_s"], 1) for r in results[case][c]],
                }
                for c in clients
            }
        doc = {
            "bench": "storage_throughput",
            "server": "seaweedfs (weed server, 127.0.0.1)",
            "size_mib": args.size_mib,
            "files": args.files,
            "file_mib": args.file_mib,
            "reps": args.reps,
            "cpus": os.cpu_count(),
            "load_avg": {
                "min": round(min(loads), 2),
                "median": round(statistics.median(loads), 2),
                "max": round(max(loads), 2),
            },
            "cases": summary,
        }
        text = json.dumps(doc, indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n")
        print(text)
        for c in (c for c in clients if c.startswith("kubetune")):
            line = " ".join(f"{case}={summary[case][c]['ratio_to_fastest']}" for case in cases)
            print(f"{c} / fastest: {line} (load {doc['load_avg']['median']})", file=sys.stderr)
    finally:
        for w in workers.values():
            w.close()
        weed.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(*sys.argv[2:6])
    else:
        main()
