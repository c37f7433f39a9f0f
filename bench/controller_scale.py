#!/usr/bin/env python3
"""Controller scale benchmark: a burst of N FineTuneJobs on M fake GPU nodes (kwok), measured
against the ceiling of a bare client on the same machine, in the same run.

1. Bare-client ceiling: a tuned client (many threads, pooled connections, raw JSON) creates
   the same children the controller would (ConfigMap, headless Service, Indexed Job — the
   real render output) for N names in namespace `bare`, all given at t0. Its throughput is
   the most this machine's API server can take for this work; its p99 (t0 -> Job) is the
   latency a perfect controller would have. A second bare run also creates each FineTuneJob
   and writes one status per job (as users and any controller must): on a machine where the
   API server shares the cores, that is the like-for-like ceiling.
2. Controller: the real controller runs as a local process with its real RBAC; N
   FineTuneJobs are created at once from several client threads; watches record when each
   child Job appears and when the FineTuneJob reports Running.
3. Idle: with all N jobs Running, a first window (default 60 s) counts the requests while the
   burst's Events (two per job, posted at their own 10/s budget) still go out; once none is
   left to post, nothing changes, and the controller's API requests over a second window are
   counted from the API server's own metrics: a FlowSchema routes
   the controller's ServiceAccount to its own flow, and
   `apiserver_flowcontrol_dispatched_requests_total{flow_schema="kubetune-controller"}` counts
   its requests (apiserver_request_total has no per-user label).

Writes one JSON (top level: ceiling_jobs_per_s, controller_jobs_per_s, throughput_ratio,
p99_create_to_job_s, bare_p99_create_to_job_s, peak_rss_mb, idle_requests_per_s,
cpu_seconds_per_job, ...) and prints a one-line summary.

    .venv/bin/python bench/controller_scale.py --jobs 1000 --nodes 200 --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
from kubernetes import client, config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.api import FineTuneJobSpec  # noqa: E402
from orchestrator.controller.jobs import render_defaults  # noqa: E402
from orchestrator.controller.settings import ControllerSettings  # noqa: E402
from orchestrator.render import render_all  # noqa: E402
from tests.cluster.controller_support import (  # noqa: E402
    CONTROLLER_NS,
    CONTROLLER_SA,
    ControllerProcess,
    sa_kubeconfig,
)
from tests.support import Cluster  # noqa: E402

FLOW_SCHEMA = "kubetune-controller"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def job_spec() -> dict[str, Any]:
    return {
        "model": {"uri": "s3://models/llama-1b"},
        "data": {"train": "s3://d/train.jsonl", "eval": "s3://d/eval.jsonl"},
        "method": {"type": "lora", "rank": 16},
        "training": {"globalBatchSize": 8, "microBatchSize": 8},
        "distributed": {"nodes": 1, "gpusPerNode": 1},
        "output": {"uri": "s3://adapters/bench/"},
    }


def ftj(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": job_spec(),
    }


def api_client(kubeconfig: str, pool: int) -> client.ApiClient:
    cfg = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    cfg.connection_pool_maxsize = pool
    return client.ApiClient(cfg)


class JobWatch:
    """Records when each child Job first appears (by its kubetune.io/job label or name)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.seen: dict[str, float] = {}
        self.api, self.namespace = api, namespace
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        batch = client.BatchV1Api(self.api)
        while not self._stop.is_set():
            try:
                resp = batch.list_namespaced_job(
                    self.namespace, watch=True, timeout_seconds=300, _preload_content=False,
                    allow_watch_bookmarks=False,
                )
                for line in iter_resp_lines(resp):
                    now = time.monotonic()
                    obj = json.loads(line).get("object") or {}
                    meta = obj.get("metadata") or {}
                    key = (meta.get("labels") or {}).get("kubetune.io/job") or meta.get("name")
                    if key and key not in self.seen:
                        self.seen[key] = now
                    if self._stop.is_set():
                        return
            except Exception:
                time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()


def bare_children(name: str, namespace: str) -> list[dict[str, Any]]:
    meta = {"name": name, "namespace": namespace, "uid": "", "labels": {}}
    spec = FineTuneJobSpec.model_validate(job_spec())
    out = []
    for child in render_all(meta, spec, 1, render_defaults(ControllerSettings())):
        child["metadata"].pop("ownerReferences", None)
        out.append(child)
    return sorted(out, key=lambda c: c["kind"] != "Job")


def run_bare(cluster: Cluster, kubeconfig: str, n: int, threads: int,
             with_submit: bool = False) -> dict[str, Any]:
    """The bare client's ceiling. ``with_submit``: it also creates each FineTuneJob first
    and writes one status (what users and any controller must send in all), so the API
    server does the same work as in the controller run, minus the controller's own."""
    ns = "bare-submit" if with_submit else "bare"
    cluster.kubectl("create", "namespace", ns)
    api = api_client(kubeconfig, threads + 4)
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    custom = client.CustomObjectsApi(api)
    fns: dict[str, Any] = {
        "ConfigMap": core.create_namespaced_config_map,
        "Service": core.create_namespaced_service,
        "Job": batch.create_namespaced_job,
    }
    bodies = {f"bare-{i:05d}": bare_children(f"bare-{i:05d}", ns) for i in range(n)}
    watch = JobWatch(api, ns)
    time.sleep(1.0)
    done: dict[str, float] = {}

    def create(name: str) -> None:
        if with_submit:
            custom.create_namespaced_custom_object(
                "kubetune.io", "v1alpha1", ns, "finetunejobs", ftj(name),
                _preload_content=False)
        for child in bodies[name]:
            fns[child["kind"]](ns, child, _preload_content=False)
        if with_submit:
            custom.patch_namespaced_custom_object_status(
                "kubetune.io", "v1alpha1", ns, "finetunejobs", name,
                {"status": {"phase": "Pending", "message": "attempt 1 created"}},
                _preload_content=False)
        done[name] = time.monotonic()

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(create, bodies))
    deadline = time.monotonic() + 60
    while len(watch.seen) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    watch.stop()
    lat = [watch.seen[k] - t0 for k in bodies if k in watch.seen]
    last = max(watch.seen.values()) if watch.seen else time.monotonic()
    result = {
        "threads": threads,
        "jobs_per_s": round(n / max(1e-9, last - t0), 2),
        "p50_t0_to_job_s": round(pct(lat, 50), 3),
        "p99_t0_to_job_s": round(pct(lat, 99), 3),
        "seconds": round(last - t0, 2),
    }
    print(f"[bench] bare client: {result}", file=sys.stderr)
    # out of the controller's way: delete the namespace and wait until it is gone
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if cluster.kubectl("get", "namespace", ns, check=False).returncode != 0:
            break
        time.sleep(2)
    return result


def flow_schema(cluster: Cluster) -> None:
    fs = {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
        "kind": "FlowSchema",
        "metadata": {"name": FLOW_SCHEMA},
        "spec": {
            "matchingPrecedence": 500,
            "priorityLevelConfiguration": {"name": "workload-high"},
            "distinguisherMethod": {"type": "ByUser"},
            "rules": [
                {
                    "subjects": [
                        {
                            "kind": "ServiceAccount",
                            "serviceAccount": {"name": CONTROLLER_SA, "namespace": CONTROLLER_NS},
                        }
                    ],
                    "resourceRules": [
                        {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                         "clusterScope": True, "namespaces": ["*"]}
                    ],
                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(fs))


def controller_requests(cluster: Cluster) -> float:
    text = cluster.kubectl("get", "--raw", "/metrics").stdout
    total = 0.0
    pat = re.compile(
        r'^apiserver_flowcontrol_dispatched_requests_total\{[^}]*flow_schema="'
        + FLOW_SCHEMA + r'"[^}]*\}\s+([0-9.e+]+)$'
    )
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            total += float(m.group(1))
    return total


def controller_metrics(metrics_port: int) -> str:
    import urllib.request

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    return urllib.request.urlopen(url, timeout=5).read().decode()


def own_requests(metrics_port: int) -> dict[str, float]:
    """The controller's own count of its API requests by verb (every call, the Lease
    included)."""
    counts: dict[str, float] = {}
    for line in controller_metrics(metrics_port).splitlines():
        m = re.match(r'^kubetune_api_requests_total\{verb="([^"]*)"\}\s+(\S+)$', line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0.0) + float(m.group(2))
    return counts


def events_pending(metrics_port: int) -> float:
    m = re.search(r"^kubetune_events_pending (\S+)$", controller_metrics(metrics_port), re.M)
    return float(m.group(1)) if m else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8, help="threads creating FineTuneJobs")
    ap.add_argument("--bare-threads", type=int, default=32, help="threads of the bare client")
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--workers", type=int, default=0, help="controller workers (0: default)")
    ap.add_argument("--skip-bare", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "controller_scale.json"))
    ap.add_argument("--cluster", default="kubetune-bench")
    ap.add_argument("--keep-cluster", action="store_true")
    ap.add_argument("--kubeconfig", help="use this running cluster (with --nodes fake nodes)")
    args = ap.parse_args()

    env = dict(os.environ, KUBETUNE_CLUSTER=args.cluster, KUBETUNE_NODES=str(args.nodes))
    t0 = time.monotonic()
    if args.kubeconfig:
        kubeconfig = args.kubeconfig
        args.keep_cluster = True
    else:
        up = subprocess.run(
            [str(REPO / "tools" / "cluster.sh"), "up"], env=env, capture_output=True, text=True,
            check=False,
        )
        if up.returncode != 0:
            print(up.stderr[-3000:], file=sys.stderr)
            return 1
        kubeconfig = up.stdout.strip().splitlines()[-1].split("=", 1)[1]
    print(f"[bench] {args.nodes} nodes up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    cluster = Cluster(kubeconfig, started_here=True)
    ctl: ControllerProcess | None = None
    try:
        for crd in sorted((REPO / "manifests" / "crds").glob("kubetune.io_*.yaml")):
            cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
        cluster.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io")
        base = REPO / "manifests" / "base"
        for f in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml"):
            cluster.kubectl("apply", "-f", str(base / f))
        flow_schema(cluster)

        bare = bare_submit = None
        if not args.skip_bare:
            bare = run_bare(cluster, kubeconfig, args.jobs, args.bare_threads)
            bare_submit = run_bare(cluster, kubeconfig, args.jobs, args.bare_threads,
                                   with_submit=True)

        ns = "bench"
        cluster.kubectl("create", "namespace", ns)
        cluster.kubectl(
            "create", "secret", "generic", "s3-credentials", "-n", ns,
            "--from-literal=AWS_ACCESS_KEY_ID=k", "--from-literal=AWS_SECRET_ACCESS_KEY=s",
        )
        work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
        extra = {"KUBETUNE_RESYNC_SECONDS": "60"}
        if args.workers:
            extra["KUBETUNE_WORKERS"] = str(args.workers)
        ctl = ControllerProcess(
            sa_kubeconfig(cluster, CONTROLLER_NS, CONTROLLER_SA, work / "kubeconfig"),
            work,
            extra_env=extra,
        )
        ctl.start()
        assert ctl.proc is not None
        proc = psutil.Process(ctl.proc.pid)
        peak_rss = [proc.memory_info().rss]
        stop = threading.Event()

        def sample_rss() -> None:
            while not stop.wait(0.5):
                try:
                    peak_rss[0] = max(peak_rss[0], proc.memory_info().rss)
                except psutil.Error:
                    return

        threading.Thread(target=sample_rss, daemon=True).start()
        api = api_client(kubeconfig, args.clients + 4)
        watch = JobWatch(api, ns)
        running: dict[str, float] = {}

        def watch_running() -> None:
            from kubernetes.watch.watch import iter_resp_lines

            custom = client.CustomObjectsApi(api)
            while not stop.is_set():
                try:
                    resp = custom.list_namespaced_custom_object(
                        "kubetune.io", "v1alpha1", ns, "finetunejobs", watch=True,
                        timeout_seconds=300, _preload_content=False,
                    )
                    for line in iter_resp_lines(resp):
                        obj = json.loads(line).get("object") or {}
                        name = (obj.get("metadata") or {}).get("name")
                        phase = (obj.get("status") or {}).get("phase")
                        if name and phase == "Running" and name not in running:
                            running[name] = time.monotonic()
                        if stop.is_set():
                            return
                except Exception:
                    time.sleep(0.2)

        threading.Thread(target=watch_running, daemon=True).start()
        time.sleep(1.0)
        custom = client.CustomObjectsApi(api)
        acked: dict[str, float] = {}

        def create(i: int) -> None:
            name = f"scale-{i:05d}"
            custom.create_namespaced_custom_object(
                "kubetune.io", "v1alpha1", ns, "finetunejobs", ftj(name), _preload_content=False
            )
            acked[name] = time.monotonic()

        cpu0 = proc.cpu_times()
        t_start = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(create, range(args.jobs)))
        t_submitted = time.monotonic()
        deadline = t_start + args.timeout
        while len(watch.seen) < args.jobs and time.monotonic() < deadline:
            time.sleep(0.2)
        cpu_jobs = proc.cpu_times()
        while len(running) < args.jobs and time.monotonic() < deadline:
            time.sleep(0.5)
        t_running = time.monotonic()
        cpu1 = proc.cpu_times()

        # right after: the Events of the burst (two per job) still go out at their own rate
        time.sleep(5)
        own_after0, t_after0 = own_requests(ctl.metrics_port), time.monotonic()
        time.sleep(args.idle_seconds)
        own_after1, t_after1 = own_requests(ctl.metrics_port), time.monotonic()
        after_rate = (sum(own_after1.values()) - sum(own_after0.values())) / (t_after1 - t_after0)
        # idle: nothing changes and nothing is left to post; count the controller's requests
        t_drain0 = time.monotonic()
        while events_pending(ctl.metrics_port) > 0 and time.monotonic() < t_drain0 + 900:
            time.sleep(1)
        drain_s = time.monotonic() - t_drain0
        time.sleep(2)
        req0, t_idle0 = controller_requests(cluster), time.monotonic()
        own0 = own_requests(ctl.metrics_port)
        cpu_idle0 = proc.cpu_times()
        time.sleep(args.idle_seconds)
        req1, t_idle1 = controller_requests(cluster), time.monotonic()
        own1 = own_requests(ctl.metrics_port)
        cpu_idle1 = proc.cpu_times()
        stop.set()
        watch.stop()

        def cpu(a: Any, b: Any) -> float:
            return (b.user + b.system) - (a.user + a.system)

        seen = watch.seen
        to_job = [seen[n] - acked[n] for n in acked if n in seen]
        burst_to_job = [seen[n] - t_start for n in acked if n in seen]
        to_run = [running[n] - acked[n] for n in acked if n in running]
        last_job = max(seen.values()) if seen else time.monotonic()
        ctl_rate = len(seen) / max(1e-9, last_job - t_start)
        # the API server's count when it has API priority and fairness metrics (kwok's
        # apiserver may run without APF), else the controller's own count of its calls
        apf = req1 > 0
        idle_s = max(1e-9, t_idle1 - t_idle0)
        own_idle = {v: round((n - own0.get(v, 0.0)) / idle_s, 3) for v, n in own1.items()
                    if n > own0.get(v, 0.0)}
        idle_rate = ((req1 - req0) / idle_s) if apf else sum(own_idle.values())
        load = os.getloadavg()
        result: dict[str, Any] = {
            "benchmark": "controller_scale",
            "jobs": args.jobs,
            "nodes": args.nodes,
            "clients": args.clients,
            "machine": {"cpus": os.cpu_count(), "loadavg_1_5_15": [round(x, 2) for x in load]},
            "ceiling_jobs_per_s": bare["jobs_per_s"] if bare else None,
            "controller_jobs_per_s": round(ctl_rate, 2),
            "throughput_ratio": round(ctl_rate / bare["jobs_per_s"], 3) if bare else None,
            "ceiling_with_submit_jobs_per_s": bare_submit["jobs_per_s"] if bare_submit else None,
            "throughput_ratio_with_submit": (
                round(ctl_rate / bare_submit["jobs_per_s"], 3) if bare_submit else None
            ),
            "bare_with_submit_p99_to_job_s": (
                bare_submit["p99_t0_to_job_s"] if bare_submit else None
            ),
            "latency_ratio_p99_with_submit": (
                round(pct(burst_to_job, 99) / bare_submit["p99_t0_to_job_s"], 3)
                if bare_submit else None
            ),
            "p99_create_to_job_s": round(pct(to_job, 99), 3),
            "p50_create_to_job_s": round(pct(to_job, 50), 3),
            "p99_burst_to_job_s": round(pct(burst_to_job, 99), 3),
            "bare_p99_create_to_job_s": bare["p99_t0_to_job_s"] if bare else None,
            "latency_ratio_p99": (
                round(pct(burst_to_job, 99) / bare["p99_t0_to_job_s"], 3) if bare else None
            ),
            "p99_create_to_running_s": round(pct(to_run, 99), 3),
            "peak_rss_mb": round(peak_rss[0] / 2**20, 1),
            "idle_requests_per_s": round(idle_rate, 3),
            "idle_window_s": round(t_idle1 - t_idle0, 1),
            "idle_requests_per_s_by_verb": own_idle,
            "after_running_requests_per_s": round(after_rate, 3),
            "events_backlog_drained_s": round(drain_s + args.idle_seconds + 5, 1),
            "idle_requests_source": (
                "apiserver_flowcontrol_dispatched_requests_total{flow_schema=kubetune-controller}"
                if apf
                else "controller's kubetune_api_requests_total (API server has no APF metrics)"
            ),
            "idle_cpu_cores": round(cpu(cpu_idle0, cpu_idle1) / (t_idle1 - t_idle0), 4),
            "cpu_seconds_per_job": round(cpu(cpu0, cpu_jobs) / max(1, len(seen)), 4),
            "cpu_seconds_to_running_per_job": round(cpu(cpu0, cpu1) / max(1, len(running)), 4),
            "jobs_with_child_job": len(seen),
            "jobs_running": len(running),
            "submit_seconds": round(t_submitted - t_start, 2),
            "all_running_seconds": round(t_running - t_start, 2),
            "bare": bare,
            "bare_with_submit": bare_submit,
            "definitions": {
                "create_to_job": "child Job seen by a watch - FineTuneJob create acknowledged",
                "burst_to_job": "child Job seen - start of the burst (t0)",
                "bare_p99_create_to_job_s": "bare client: Job seen - t0 (all N given at t0)",
                "latency_ratio_p99": "p99_burst_to_job_s / bare_p99_create_to_job_s",
                "controller_jobs_per_s": "jobs / (last child Job seen - t0)",
                "ceiling_with_submit_jobs_per_s": "bare client that also creates each "
                "FineTuneJob and writes one status: the same API server work as the controller "
                "run, minus the controller's own",
                "after_running_requests_per_s": "requests/s in the window 5 s after every job "
                "is Running (the burst's Events still going out at 10/s, their own budget)",
                "events_backlog_drained_s": "seconds from all Running + 5 s until no Event "
                "is left to post",
                "idle_requests_per_s": "requests/s in the window after the Events went out",
            },
            "targets": {
                "throughput_ratio": ">= 0.8",
                "latency_ratio_p99": "<= 1.5",
                "peak_rss_mb": "<= 250",
                "idle_requests_per_s": "<= 1",
            },
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(
            f"controller_scale: {args.jobs} jobs/{args.nodes} nodes: "
            f"{result['controller_jobs_per_s']} jobs/s vs ceiling {result['ceiling_jobs_per_s']} "
            f"(ratio {result['throughput_ratio']}), p99 create->Job "
            f"{result['p99_create_to_job_s']}s (burst {result['p99_burst_to_job_s']}s vs bare "
            f"{result['bare_p99_create_to_job_s']}s), RSS {result['peak_rss_mb']} MB, idle "
            f"{result['idle_requests_per_s']} req/s, {result['cpu_seconds_per_job']} CPU s/job"
        )
        return 0
    finally:
        if ctl is not None:
            ctl.stop()
        if not args.keep_cluster:
            subprocess.run(
                [str(REPO / "tools" / "cluster.sh"), "down"], env=env, capture_output=True,
                check=False,
            )


if __name__ == "__main__":
    raise SystemExit(main())
