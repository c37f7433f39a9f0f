#!/usr/bin/env python3
"""Controller scale benchmark: N FineTuneJobs on M fake GPU nodes (kwok).

Starts its own kwok cluster (so the test cluster is untouched), runs the real controller
as a local process with its real RBAC, creates N FineTuneJobs from several client threads
and records, from watches, when each job's child batch Job appears and when the
FineTuneJob reports phase Running. Writes JSON (and prints a one-line summary):
p50/p99 create->Job and create->Running, throughput, controller CPU seconds, peak RSS.

    .venv/bin/python bench/controller_scale.py --jobs 500 --nodes 100 --out bench/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.cluster.controller_support import (  # noqa: E402
    CONTROLLER_NS,
    CONTROLLER_SA,
    ControllerProcess,
    sa_kubeconfig,
)
from tests.support import Cluster  # noqa: E402


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def job(name: str) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://models/llama-1b"},
            "data": {"train": "s3://d/train.jsonl", "eval": "s3://d/eval.jsonl"},
            "method": {"type": "lora", "rank": 16},
            "training": {"globalBatchSize": 8, "microBatchSize": 8},
            "distributed": {"nodes": 1, "gpusPerNode": 1},
            "output": {"uri": "s3://adapters/bench/"},
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--clients", type=int, default=8, help="parallel creating threads")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="submissions per second (0: as fast as the clients can: a burst)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "controller_scale.json"))
    ap.add_argument("--keep-cluster", action="store_true")
    args = ap.parse_args()

    env = dict(os.environ, KUBETUNE_CLUSTER="kubetune-bench", KUBETUNE_NODES=str(args.nodes))
    t0 = time.monotonic()
    up = subprocess.run(
        [str(REPO / "tools" / "cluster.sh"), "up"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    kubeconfig = up.stdout.strip().splitlines()[-1].split("=", 1)[1]
    print(
        f"[bench] cluster with {args.nodes} nodes up in {time.monotonic() - t0:.1f}s",
        file=sys.stderr,
    )
    cluster = Cluster(kubeconfig, started_here=True)
    try:
        for crd in sorted((REPO / "manifests" / "crds").glob("kubetune.io_*.yaml")):
            cluster.kubectl("apply", "--server-side", "-f", str(crd))
        cluster.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io")
        base = REPO / "manifests" / "base"
        for f in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml"):
            cluster.kubectl("apply", "-f", str(base / f))
        ns = "bench"
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl(
            "create",
            "secret",
            "generic",
            "s3-credentials",
            "-n",
            ns,
            "--from-literal=AWS_ACCESS_KEY_ID=k",
            "--from-literal=AWS_SECRET_ACCESS_KEY=s",
        )
        work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
        ctl = ControllerProcess(
            sa_kubeconfig(cluster, CONTROLLER_NS, CONTROLLER_SA, work / "kubeconfig"),
            work,
            extra_env={"KUBETUNE_RESYNC_SECONDS": "30"},
        )
        ctl.start()
        proc = psutil.Process(ctl.proc.pid)  # type: ignore[union-attr]
        cpu0 = proc.cpu_times()

        api = config.new_client_from_config(config_file=kubeconfig)
        created: dict[str, float] = {}
        job_seen: dict[str, float] = {}
        running: dict[str, float] = {}
        peak_rss = [proc.memory_info().rss]
        stop = threading.Event()

        def watch_jobs() -> None:
            w = watch.Watch()
            for ev in w.stream(
                client.BatchV1Api(api).list_namespaced_job, ns, timeout_seconds=int(args.timeout)
            ):
                parent = (ev["object"].metadata.labels or {}).get("kubetune.io/job")
                if parent and parent not in job_seen:
                    job_seen[parent] = time.monotonic()
                if stop.is_set():
                    return

        def watch_ftjs() -> None:
            w = watch.Watch()
            for ev in w.stream(
                client.CustomObjectsApi(api).list_namespaced_custom_object,
                "kubetune.io",
                "v1alpha1",
                ns,
                "finetunejobs",
                timeout_seconds=int(args.timeout),
            ):
                obj = ev["object"]
                name = obj["metadata"]["name"]
                if (obj.get("status") or {}).get("phase") == "Running" and name not in running:
                    running[name] = time.monotonic()
                if stop.is_set():
                    return

        def sample_rss() -> None:
            while not stop.wait(0.5):
                try:
                    peak_rss[0] = max(peak_rss[0], proc.memory_info().rss)
                except psutil.Error:
                    return

        for target in (watch_jobs, watch_ftjs, sample_rss):
            threading.Thread(target=target, daemon=True).start()
        time.sleep(1)

        custom = client.CustomObjectsApi(api)

        acked: dict[str, float] = {}

        def create(i: int) -> None:
            if args.rate > 0:  # steady arrivals: job i is due at t_start + i / rate
                time.sleep(max(0.0, t_start + i / args.rate - time.monotonic()))
            name = f"scale-{i:05d}"
            created[name] = time.monotonic()
            custom.create_namespaced_custom_object(
                "kubetune.io", "v1alpha1", ns, "finetunejobs", job(name)
            )
            acked[name] = time.monotonic()

        t_start = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(create, range(args.jobs)))
        t_created = time.monotonic()
        deadline = t_start + args.timeout
        while len(running) < args.jobs and time.monotonic() < deadline:
            time.sleep(0.5)
        t_end = time.monotonic()
        stop.set()
        cpu1 = proc.cpu_times()

        to_job = [job_seen[n] - created[n] for n in created if n in job_seen]
        to_run = [running[n] - created[n] for n in created if n in running]
        # from the API server's acknowledgement of the create (excludes client-side queueing)
        ack_to_job = [job_seen[n] - acked[n] for n in acked if n in job_seen]
        create_call = [acked[n] - created[n] for n in acked]
        result = {
            "benchmark": "controller_scale",
            "jobs": args.jobs,
            "nodes": args.nodes,
            "clients": args.clients,
            "jobs_with_child_job": len(to_job),
            "jobs_running": len(to_run),
            "create_to_job_p50_s": round(pct(to_job, 50), 4),
            "create_to_job_p99_s": round(pct(to_job, 99), 4),
            "create_to_running_p50_s": round(pct(to_run, 50), 4),
            "create_to_running_p99_s": round(pct(to_run, 99), 4),
            "create_to_job_mean_s": round(statistics.fmean(to_job), 4) if to_job else None,
            "acked_to_job_p50_s": round(pct(ack_to_job, 50), 4),
            "acked_to_job_p99_s": round(pct(ack_to_job, 99), 4),
            "create_call_p50_s": round(pct(create_call, 50), 4),
            "create_call_p99_s": round(pct(create_call, 99), 4),
            "submit_seconds": round(t_created - t_start, 2),
            "all_running_seconds": round(t_end - t_start, 2),
            "throughput_jobs_per_s": round(len(to_run) / (t_end - t_start), 2),
            "controller_cpu_seconds": round(
                (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2
            ),
            "controller_peak_rss_mb": round(peak_rss[0] / 2**20, 1),
            "targets": {"create_to_job_p99_s": 1.0, "controller_peak_rss_mb": 250},
        }
        ctl.stop()
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(
            f"controller_scale: {args.jobs} jobs/{args.nodes} nodes: create->Job p50 "
            f"{result['create_to_job_p50_s']}s p99 {result['create_to_job_p99_s']}s, "
            f"->Running p99 {result['create_to_running_p99_s']}s, "
            f"{result['throughput_jobs_per_s']} jobs/s, CPU {result['controller_cpu_seconds']}s, "
            f"peak RSS {result['controller_peak_rss_mb']} MB"
        )
        return 0
    finally:
        if not args.keep_cluster:
            subprocess.run(
                [str(REPO / "tools" / "cluster.sh"), "down"], env=env, capture_output=True
            )


if __name__ == "__main__":
    raise SystemExit(main())
