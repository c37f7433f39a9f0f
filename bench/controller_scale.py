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
4. Progress (--progress-seconds, default 120; 0 skips it): every job posts what its
   trainer's ProgressPoster would, with its real job token (minted with mint_job_token from
   the master key Secret, read from the API server), every --progress-period s (30) at a
   random phase, steps increasing, from one aiohttp client with a bounded keep-alive pool.
   First against a bare aiohttp server that only checks the tokens (the ceiling), then
   against the controller's POST /report: its CPU cores and peak RSS over the window, the
   answers and their latency, the FineTuneJob status writes (apiserver_request_total)
   against their bound, the gaps between one job's writes, and whether every job's
   status.progress ends at its last posted step (progress_* keys).

Writes one JSON (top level: ceiling_jobs_per_s, controller_jobs_per_s, throughput_ratio,
p99_create_to_job_s, bare_p99_create_to_job_s, peak_rss_mb, idle_requests_per_s,
cpu_seconds_per_job, ..., progress_controller_cores, progress_peak_rss_mb, ...) and prints
a one-line summary (two with the progress phase).

    .venv/bin/python bench/controller_scale.py --jobs 1000 --nodes 200 --out FILE
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

import psutil
import yaml
from kubernetes import client, config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.api import FineTuneJobSpec  # noqa: E402
from orchestrator.controller.handlers import Controller  # noqa: E402
from orchestrator.controller.jobs import render_defaults  # noqa: E402
from orchestrator.controller.settings import ControllerSettings  # noqa: E402
from orchestrator.render import render_all  # noqa: E402
from orchestrator.sweep import bearer_token, mint_job_token, verify_job_token  # noqa: E402
from tests.cluster.controller_support import (  # noqa: E402
    CONTROLLER_NS,
    CONTROLLER_SA,
    ControllerProcess,
    sa_kubeconfig,
)
from tests.support import Cluster, free_port  # noqa: E402

FLOW_SCHEMA = "kubetune-controller"
PROGRESS_INTERVAL = Controller.PROGRESS_INTERVAL  # at most one progress write per job per 30 s


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


COMPONENTS = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok")


class ComponentCpu:
    """CPU seconds of every process the burst costs, by component: the test cluster's own
    (found by its name in their command lines), the controller and this bench (its clients and
    watches). On a machine where they all share the cores, their sum per job is what bounds
    throughput, and the split says which part a controller could still make cheaper."""

    def __init__(self, cluster_name: str, controller: psutil.Process | None = None) -> None:
        self.procs: dict[str, list[psutil.Process]] = {c: [] for c in COMPONENTS}
        marker = f"/clusters/{cluster_name}/"
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if not cmd or marker not in " ".join(cmd):
                continue
            base = os.path.basename(cmd[0])
            comp = next((c for c in COMPONENTS if base == c or base.startswith(c)), None)
            if comp:
                self.procs[comp].append(p)
        if controller is not None:
            self.procs["controller"] = [controller]
        self.procs["bench"] = [psutil.Process()]

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for comp, procs in self.procs.items():
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
            out[comp] = total
        return out

    @staticmethod
    def per_job_ms(a: dict[str, float], b: dict[str, float], jobs: int) -> dict[str, float]:
        ms = {c: round((b[c] - a[c]) * 1000 / max(1, jobs), 2) for c in a}
        ms["total"] = round(sum(ms.values()), 2)
        return ms


def zero_cost_bound(bare: dict[str, Any] | None, bare_submit: dict[str, Any],
                    result: dict[str, Any]) -> dict[str, Any]:
    """The most any controller could reach on this machine: the cluster's own CPU per job in
    the with-submit run (API server, etcd, kube-controller-manager, scheduler, kwok: what a
    FineTuneJob create, its three children and one status write cost, whoever sends them)
    plus the users' create clients as measured in the controller run, with the controller
    itself free and sending nothing more. All processes share the cores."""
    cluster_ms = sum(v for k, v in bare_submit["cpu_ms_per_job_by_component"].items()
                     if k in COMPONENTS)
    users_ms = result["cpu_ms_per_job_by_component"]["bench"]
    rate = (os.cpu_count() or 1) * 1000 / max(1e-9, cluster_ms + users_ms)
    out = {"zero_cost_controller_jobs_per_s": round(rate, 2)}
    if bare:
        out["zero_cost_controller_ratio"] = round(rate / bare["jobs_per_s"], 3)
    return out


def run_bare(cluster: Cluster, kubeconfig: str, n: int, threads: int, meter: ComponentCpu,
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

    req0 = apiserver_requests(cluster)
    cpu0 = meter.snapshot()
    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(create, bodies))
    deadline = time.monotonic() + 60
    while len(watch.seen) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    cpu1 = meter.snapshot()
    req1 = apiserver_requests(cluster)
    watch.stop()
    lat = [watch.seen[k] - t0 for k in bodies if k in watch.seen]
    last = max(watch.seen.values()) if watch.seen else time.monotonic()
    result = {
        "threads": threads,
        "jobs_per_s": round(n / max(1e-9, last - t0), 2),
        "p50_t0_to_job_s": round(pct(lat, 50), 3),
        "p99_t0_to_job_s": round(pct(lat, 99), 3),
        "seconds": round(last - t0, 2),
        "cpu_ms_per_job_by_component": ComponentCpu.per_job_ms(cpu0, cpu1, n),
        "apiserver_requests_per_job": requests_per_job(req0, req1, n),
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


def install_rbac(cluster: Cluster) -> None:
    """The controller's ServiceAccount and RBAC for every namespace (the bench's jobs live in
    their own): the cluster-wide overlay's, where the base grants only its own namespace."""
    base = REPO / "manifests" / "base"
    cluster.kubectl("apply", "-f", str(base / "namespace.yaml"))
    overlay = REPO / "manifests" / "overlays" / "cluster-wide"
    if not overlay.is_dir():  # a base that is cluster-wide itself
        for f in ("serviceaccount.yaml", "rbac.yaml"):
            cluster.kubectl("apply", "-f", str(base / f))
        return
    kinds = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    docs = yaml.safe_load_all(cluster.kubectl("kustomize", str(overlay)).stdout)
    rbac = [d for d in docs if d and d["kind"] in kinds]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))


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


# --- progress phase: every job's trainer posts live progress every 30 s ----------------------
PROGRESS_BODY_CAP = 64 * 1024


def parse_labels(text: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', text))


def apiserver_requests(cluster: Cluster) -> dict[tuple[str, str], tuple[float, float]]:
    """What the API server has served so far (all clients, all codes): (verb, resource[/sub])
    -> (requests, seconds), from apiserver_request_total and
    apiserver_request_duration_seconds_sum."""
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for line in cluster.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        name, _, rest = line.partition("{")
        if name not in ("apiserver_request_total", "apiserver_request_duration_seconds_sum"):
            continue
        labels, _, value = rest.rpartition("} ")
        lab = parse_labels(labels)
        resource = lab.get("resource", "")
        if lab.get("subresource"):
            resource += "/" + lab["subresource"]
        key = (lab.get("verb", ""), resource)
        n, sec = out.get(key, (0.0, 0.0))
        if name == "apiserver_request_total":
            n += float(value)
        else:
            sec += float(value)
        out[key] = (n, sec)
    return out


def requests_per_job(a: dict[tuple[str, str], tuple[float, float]],
                     b: dict[tuple[str, str], tuple[float, float]], jobs: int) -> dict[str, float]:
    """Writes and reads per job between two apiserver_requests() readings ("VERB resource"),
    watches left out (their count is connections, not events)."""
    out = {}
    for key, (n, _) in sorted(b.items()):
        verb, resource = key
        delta = n - a.get(key, (0.0, 0.0))[0]
        if verb != "WATCH" and delta >= 0.05 * jobs:
            out[f"{verb} {resource}"] = round(delta / max(1, jobs), 2)
    return out


def apiserver_status_writes(cluster: Cluster) -> tuple[float, float]:
    """FineTuneJob status writes the API server has served (all codes, verbs
    PATCH/UPDATE/APPLY on finetunejobs/status) and the seconds it spent on them. The metrics
    have no user label; during the progress window nothing but the controller writes a
    FineTuneJob status."""
    total = seconds = 0.0
    for (verb, resource), (n, sec) in apiserver_requests(cluster).items():
        if resource == "finetunejobs/status" and verb in ("PATCH", "UPDATE", "APPLY"):
            total, seconds = total + n, seconds + sec
    return total, seconds


def read_master_key(api: client.ApiClient) -> bytes:
    """The report master key, read from its Secret in the controller's namespace as the
    controller reads it (SweepManager.load_master_key: data.key, base64)."""
    name = ControllerSettings().report_key_secret
    secret = client.CoreV1Api(api).read_namespaced_secret(name, CONTROLLER_NS)
    raw = (secret.data or {}).get("key")
    if not raw:
        raise RuntimeError(f"Secret {CONTROLLER_NS}/{name} has no key")
    return base64.b64decode(raw)


def list_ftjs(api: client.ApiClient, namespace: str) -> list[dict[str, Any]]:
    doc: Any = client.CustomObjectsApi(api).list_namespaced_custom_object(
        "kubetune.io", "v1alpha1", namespace, "finetunejobs")
    return list(doc["items"])


class Poster:
    """One FineTuneJob's trainer: name, namespace, attempt and its progress token."""

    def __init__(self, namespace: str, name: str, attempt: int, token: str, offset: float):
        self.namespace, self.name, self.attempt = namespace, name, attempt
        self.token, self.offset = token, offset


def posters_for(api: client.ApiClient, namespace: str, master: bytes,
                period: float, seed: int) -> tuple[list[Poster], dict[str, str]]:
    """A poster per FineTuneJob in `namespace`, its token minted with the project's
    mint_job_token from the master key and the job's uid (what the controller puts in the
    pods' KUBETUNE_REPORT_TOKEN), and a jittered phase in [0, period)."""
    rng = random.Random(seed)
    items = list_ftjs(api, namespace)
    posters, uids = [], {}
    for obj in sorted(items, key=lambda o: o["metadata"]["name"]):
        meta = obj["metadata"]
        attempt = int((obj.get("status") or {}).get("attempts") or 1)
        posters.append(Poster(namespace, meta["name"], attempt,
                              mint_job_token(master, meta["uid"]), rng.uniform(0, period)))
        uids[f"{namespace}/{meta['name']}"] = meta["uid"]
    return posters, uids


def progress_body(p: Poster, step: int, total: int) -> bytes:
    """Exactly what ProgressPoster sends (identity + step + the callback's progress)."""
    frac = step / total
    progress = {"step": step, "totalSteps": total, "epoch": round(3 * frac, 4),
                "trainLoss": round(2.5 - frac, 4), "tokensPerSecond": 5123.4,
                "etaSeconds": round((total - step) * 0.4, 1), "mfu": 0.41}
    return json.dumps({"job": p.name, "namespace": p.namespace, "attempt": p.attempt,
                       "step": step, "progress": progress}).encode()


async def drive_posts(url: str, posters: list[Poster], window: float, period: float,
                      conns: int, step_base: int) -> dict[str, Any]:
    """Each poster posts every `period` s at its own phase for `window` s, steps increasing,
    through one aiohttp session of at most `conns` keep-alive connections. Returns the
    records (job, step, code, latency s, lag s, done at) and the start time."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=conns, keepalive_timeout=10)
    timeout = aiohttp.ClientTimeout(total=5.0)  # the trainer's ProgressPoster timeout
    records: list[tuple[str, int, Any, float, float, float]] = []
    total_steps = step_base + 10 * (int(window / period) + 2)
    t0 = time.monotonic() + 0.5

    async def one(session: aiohttp.ClientSession, p: Poster) -> None:
        k = 0
        while (at := t0 + p.offset + k * period) < t0 + window:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            step = step_base + 10 * (k + 1)
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {p.token}"}
            start = time.monotonic()
            code: Any
            try:
                async with session.post(url, data=progress_body(p, step, total_steps),
                                        headers=headers) as resp:
                    await resp.read()
                    code = resp.status
            except Exception as exc:  # counted (timeouts, resets), as the trainer only logs them
                code = type(exc).__name__
            done = time.monotonic()
            records.append((p.name, step, code, done - start, start - at, done))
            k += 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one(session, p) for p in posters))
    return {"records": records, "t0": t0}


def post_stats(run: dict[str, Any], window: float) -> dict[str, Any]:
    recs = run["records"]
    codes: Counter[str] = Counter(str(r[2]) for r in recs)
    ok = [r for r in recs if isinstance(r[2], int) and 200 <= r[2] < 300]
    lat = [r[3] for r in recs]
    return {
        "posts": len(recs),
        "accepted_2xx": len(ok),
        "rejected": len(recs) - len(ok),
        "by_code": dict(sorted(codes.items())),
        "posts_per_s": round(len(recs) / window, 2),
        "latency_p50_ms": round(pct(lat, 50) * 1000, 2),
        "latency_p99_ms": round(pct(lat, 99) * 1000, 2),
        "latency_max_ms": round(max(lat, default=float("nan")) * 1000, 2),
        "client_lag_p99_ms": round(pct([r[4] for r in recs], 99) * 1000, 2),
    }


def run_bare_report(posters: list[Poster], uids: dict[str, str], master: bytes,
                    args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The like-for-like ceiling of the endpoint: the same posts, schedule and client against
    a minimal aiohttp server (its own process, as the controller is) that only parses the
    JSON, verifies the token (verify_job_token), refuses replayed steps and answers
    continue. What it cannot cost: the controller's queue hop to a worker, the reconcile and
    the coalesced status writes (and their watch events)."""
    spec = work / "bare-report.json"
    spec.write_text(json.dumps({"master": base64.b64encode(master).decode(), "uids": uids}))
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-bare-report", str(spec),
                             "--port", str(port)], cwd=REPO)
    try:
        import urllib.request

        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("bare report server did not start") from None
                time.sleep(0.2)
        ps = psutil.Process(proc.pid)
        cpu0, t0 = ps.cpu_times(), time.monotonic()
        run = asyncio.run(drive_posts(f"http://127.0.0.1:{port}/report", posters,
                                      args.progress_seconds, args.progress_period,
                                      args.progress_conns, step_base=0))
        cpu1, t1 = ps.cpu_times(), time.monotonic()
        rss = ps.memory_info().rss
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    stats = post_stats(run, args.progress_seconds)
    stats["cpu_cores"] = round(
        ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / (t1 - t0), 4)
    stats["rss_mb"] = round(rss / 2**20, 1)
    print(f"[bench] bare report server: {stats}", file=sys.stderr)
    return stats


def serve_bare_report(spec_file: str, port: int) -> int:
    """The bare report server (runs in its own process)."""
    from aiohttp import web

    doc = json.loads(Path(spec_file).read_text())
    master, uids = base64.b64decode(doc["master"]), doc["uids"]
    steps: dict[str, int] = {}

    async def report(request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        key = f"{body.get('namespace')}/{body.get('job')}"
        token = bearer_token(request.headers.get("Authorization"))
        step = body.get("step")
        if not verify_job_token(master, token, uids.get(key, "")):
            return web.json_response({"error": "forbidden"}, status=403)
        if not isinstance(step, int) or step <= steps.get(key, -1):
            return web.json_response({"error": "forbidden"}, status=403)
        steps[key] = step
        return web.json_response({"action": "continue"})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=PROGRESS_BODY_CAP)
    app.router.add_post("/report", report)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                backlog=1024, keepalive_timeout=15.0, handle_signals=True)
    return 0


PROGRESS_DEFINITIONS = {
    "progress_phase": "after the idle windows, each job posts what its trainer's ProgressPoster "
    "would (identity, step + 10 each time, progress fields) with its real job token (minted "
    "with mint_job_token from the master key Secret read from the API server) to the "
    "controller's POST /report, every progress_period_s at a random phase, for "
    "progress_window_s, from one aiohttp client of progress_client_connections keep-alive "
    "connections; client timeout 5 s as the trainer's",
    "progress_controller_cores": "controller CPU seconds (user+system, /proc) / wall over the "
    "posting window; _incl_drain adds the PROGRESS_INTERVAL + 5 s after the last post, when "
    "the last coalesced writes go out",
    "progress_latency_p50_ms": "post sent -> answer read, at the client (the controller's "
    "handler waits for the job's reconcile to take the report)",
    "progress_status_patches": "delta of apiserver_request_total{resource=finetunejobs,"
    "subresource=status, verb PATCH|UPDATE|APPLY} from the window's start to the end of the "
    "drain (no other writer of FineTuneJob status runs then); _controller_count: the "
    "controller's own count of its patch calls over the same span",
    "progress_status_patch_bound": "jobs x (floor(window / 30 s) + 1): with posts 30 s apart "
    "a job posts at most that often in the window, and each written status carries a post; "
    "with faster posts (--progress-period < 30) jobs x (floor(window / 30 s) + 2): one write "
    "per 30 s, the last one possibly after the window",
    "progress_min_write_gap_s": "smallest time between two changes of one job's "
    "status.progress.step seen by a watch (coalescing: >= 30 s less watch delivery jitter); "
    "progress_write_gaps_under_interval counts gaps under PROGRESS_INTERVAL - 1 s",
    "progress_final_status_matches_last_step": "jobs whose status.progress.step equals their "
    "last accepted post's step, from one LIST after the drain (PROGRESS_INTERVAL + 5 s after "
    "the last post)",
    "progress_status_lag_p99_s": "per accepted post: first time a watch saw status.progress.step "
    ">= its step - the post's answer (coalescing allows up to PROGRESS_INTERVAL)",
    "progress_bare": "ceiling: the same posts, schedule and client against a minimal aiohttp "
    "server in its own process that parses the JSON, verifies the token (verify_job_token) "
    "and refuses replayed steps, nothing else (no queue hop, reconcile or status write); "
    "run right before the controller's window",
    "progress_latency_ratio_p99": "progress_latency_p99_ms / progress_bare_latency_p99_ms",
    "progress_cpu_ratio": "progress_controller_cores / progress_bare_cores",
}


def metric_total(metrics_port: int, name: str) -> float:
    """Sum of a counter over its labels, from the controller's metrics page."""
    pat = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+(\S+)$")
    return sum(float(m.group(1)) for line in controller_metrics(metrics_port).splitlines()
               if (m := pat.match(line)))


class RssPeak:
    """Samples a process's RSS twice a second: the peak overall and since the last mark."""

    def __init__(self, proc: psutil.Process, stop: threading.Event) -> None:
        self.proc, self.stop = proc, stop
        self.peak = self.window = proc.memory_info().rss
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                rss = self.proc.memory_info().rss
            except psutil.Error:
                return
            self.peak, self.window = max(self.peak, rss), max(self.window, rss)

    def mark(self) -> int:
        """Starts a new window; returns the RSS now."""
        rss = self.proc.memory_info().rss
        self.window = rss
        return rss


def run_controller_progress(
    cluster: Cluster, api: client.ApiClient, ctl: ControllerProcess, proc: psutil.Process,
    rss: RssPeak,
    posters: list[Poster], seen: dict[str, list[tuple[float, int]]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The same posts against the controller's real report endpoint; what they cost it and
    what reached status.progress."""
    window, period = args.progress_seconds, args.progress_period
    (writes0, wsec0), fs0 = apiserver_status_writes(cluster), controller_requests(cluster)
    own0 = own_requests(ctl.metrics_port)
    rec0 = metric_total(ctl.metrics_port, "kubetune_reconciles_total")
    rsec0 = metric_total(ctl.metrics_port, "kubetune_reconcile_duration_seconds_sum")
    rss0 = rss.mark()
    load0 = os.getloadavg()[0]
    me = psutil.Process()
    me0 = me.cpu_times()
    cpu0, t0 = proc.cpu_times(), time.monotonic()
    run = asyncio.run(drive_posts(ctl.report_url, posters, window, period,
                                  args.progress_conns, step_base=0))
    cpu1, t1 = proc.cpu_times(), time.monotonic()
    me1 = me.cpu_times()
    load1 = os.getloadavg()[0]
    rss_window = rss.window
    rss_end = proc.memory_info().rss
    # the last posts' coalesced writes land within PROGRESS_INTERVAL of them
    time.sleep(PROGRESS_INTERVAL + 5)
    cpu2, t2 = proc.cpu_times(), time.monotonic()
    (writes1, wsec1), fs1 = apiserver_status_writes(cluster), controller_requests(cluster)
    own1 = own_requests(ctl.metrics_port)
    rec1 = metric_total(ctl.metrics_port, "kubetune_reconciles_total")
    rsec1 = metric_total(ctl.metrics_port, "kubetune_reconcile_duration_seconds_sum")
    rss_window = max(rss_window, rss.window)

    def cpu(a: Any, b: Any) -> float:
        return (b.user + b.system) - (a.user + a.system)

    stats = post_stats(run, window)
    ok = [r for r in run["records"] if isinstance(r[2], int) and 200 <= r[2] < 300]
    last: dict[str, int] = {}
    for name, step, *_ in ok:
        last[name] = max(step, last.get(name, -1))
    # final state: one LIST, every job's status.progress against its last accepted step
    items = list_ftjs(api, posters[0].namespace)
    shown = {o["metadata"]["name"]: ((o.get("status") or {}).get("progress") or {}).get("step")
             for o in items}
    final_ok = sum(1 for name, step in last.items() if shown.get(name) == step)
    # staleness: for each accepted post, when a watch first saw status.progress.step >= it
    lags, unseen = [], 0
    for name, step, _code, _lat, _lag, done in ok:
        t = next((t for t, s in seen.get(name, []) if s >= step), None)
        if t is None:
            unseen += 1
        else:
            lags.append(t - done)
    gaps = [b[0] - a[0] for obs in seen.values() for a, b in pairwise(obs)]
    changes = [len(obs) for obs in seen.values()]
    jobs = len(posters)
    writes = writes1 - writes0
    # posts at least PROGRESS_INTERVAL apart: at most one write per post; faster posts: one
    # write per interval, plus the last posts' coalesced write after the window
    bound = jobs * (math.floor(window / PROGRESS_INTERVAL) + (1 if period >= PROGRESS_INTERVAL
                                                              else 2))
    own_patch = own1.get("patch", 0.0) - own0.get("patch", 0.0)
    return {
        **{f"progress_{k}": v for k, v in stats.items()},
        "progress_window_s": round(t1 - t0, 1),
        "progress_period_s": period,
        "progress_client_connections": args.progress_conns,
        "progress_controller_cores": round(cpu(cpu0, cpu1) / (t1 - t0), 4),
        "progress_controller_cores_incl_drain": round(cpu(cpu0, cpu2) / (t2 - t0), 4),
        "progress_controller_cpu_ms_per_post": round(cpu(cpu0, cpu2) * 1000 / max(1, len(ok)), 3),
        "progress_bench_client_cores": round(cpu(me0, me1) / (t1 - t0), 4),
        "progress_peak_rss_mb": round(rss_window / 2**20, 1),
        "progress_rss_start_mb": round(rss0 / 2**20, 1),
        "progress_rss_end_mb": round(rss_end / 2**20, 1),
        "progress_loadavg_1m_start_end": [round(load0, 2), round(load1, 2)],
        "progress_status_patches": int(writes),
        "progress_status_patches_controller_count": int(own_patch),
        "progress_status_patch_bound": bound,
        "progress_status_patches_per_s": round(writes / (t2 - t0), 2),
        "progress_status_writes_per_job_max": max(changes, default=0),
        "progress_min_write_gap_s": round(min(gaps), 2) if gaps else None,
        "progress_write_gaps_under_interval": sum(1 for g in gaps if g < PROGRESS_INTERVAL - 1),
        "progress_controller_requests_per_s": round(
            ((fs1 - fs0) if fs1 > 0 else sum(own1.values()) - sum(own0.values())) / (t2 - t0), 2),
        "progress_controller_requests_per_s_by_verb": {
            v: round((n - own0.get(v, 0.0)) / (t2 - t0), 3) for v, n in own1.items()
            if n > own0.get(v, 0.0)},
        "progress_reconciles_per_s": round((rec1 - rec0) / (t2 - t0), 2),
        "progress_reconcile_mean_ms": round((rsec1 - rsec0) * 1000 / max(1, rec1 - rec0), 2),
        "progress_apiserver_status_patch_mean_ms": round(
            (wsec1 - wsec0) * 1000 / max(1, writes), 2),
        "progress_final_jobs_checked": len(last),
        "progress_final_status_matches_last_step": final_ok,
        "progress_posts_never_shown": unseen,
        "progress_status_lag_p50_s": round(pct(lags, 50), 2),
        "progress_status_lag_p99_s": round(pct(lags, 99), 2),
        "progress_status_lag_max_s": round(max(lags, default=float("nan")), 2),
    }


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
    ap.add_argument("--progress-seconds", type=float, default=120,
                    help="progress phase: once all jobs run and the idle windows are over, "
                    "every job posts live progress to the real report endpoint for this long "
                    "(0: skip the phase)")
    ap.add_argument("--progress-period", type=float, default=30,
                    help="seconds between one job's posts (the trainer's default interval)")
    ap.add_argument("--progress-conns", type=int, default=64,
                    help="keep-alive connections of the posting client (a bounded pool)")
    ap.add_argument("--skip-progress-bare", action="store_true",
                    help="skip the bare report server's ceiling for the progress phase")
    ap.add_argument("--serve-bare-report", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_bare_report:
        return serve_bare_report(args.serve_bare_report, args.port)

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
        install_rbac(cluster)
        flow_schema(cluster)

        # kwokctl keeps each cluster's files under .../clusters/<name>/
        cluster_name = Path(kubeconfig).parent.name
        bare = bare_submit = None
        if not args.skip_bare:
            meter = ComponentCpu(cluster_name)
            bare = run_bare(cluster, kubeconfig, args.jobs, args.bare_threads, meter)
            bare_submit = run_bare(cluster, kubeconfig, args.jobs, args.bare_threads, meter,
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
        stop = threading.Event()
        rss = RssPeak(proc, stop)
        api = api_client(kubeconfig, args.clients + 4)
        watch = JobWatch(api, ns)
        running: dict[str, float] = {}
        # per job: (when the watch saw it, step) for each change of status.progress.step
        progress_seen: dict[str, list[tuple[float, int]]] = {}

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
                        step = ((obj.get("status") or {}).get("progress") or {}).get("step")
                        obs = progress_seen.setdefault(name, []) if name else []
                        if isinstance(step, int) and (not obs or step != obs[-1][1]):
                            obs.append((time.monotonic(), step))
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

        meter = ComponentCpu(cluster_name, proc)
        served0 = apiserver_requests(cluster)
        comp0 = meter.snapshot()
        cpu0 = proc.cpu_times()
        t_start = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(create, range(args.jobs)))
        t_submitted = time.monotonic()
        deadline = t_start + args.timeout
        while len(watch.seen) < args.jobs and time.monotonic() < deadline:
            time.sleep(0.2)
        cpu_jobs = proc.cpu_times()
        comp_jobs = meter.snapshot()
        served_jobs = apiserver_requests(cluster)
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
        watch.stop()
        peak_rss = rss.peak

        progress: dict[str, Any] = {}
        if args.progress_seconds > 0:
            master = read_master_key(api)
            posters, uids = posters_for(api, ns, master, args.progress_period, seed=14)
            bare_report = None
            if not args.skip_progress_bare:
                bare_report = run_bare_report(posters, uids, master, args, work)
            progress = run_controller_progress(cluster, api, ctl, proc, rss, posters,
                                               progress_seen, args)
            if bare_report is not None:
                progress.update({
                    "progress_bare": bare_report,
                    "progress_bare_latency_p99_ms": bare_report["latency_p99_ms"],
                    "progress_bare_cores": bare_report["cpu_cores"],
                    "progress_latency_ratio_p99": round(
                        progress["progress_latency_p99_ms"] / bare_report["latency_p99_ms"], 2),
                    "progress_cpu_ratio": round(
                        progress["progress_controller_cores"] / max(1e-9, bare_report["cpu_cores"]),
                        2),
                })
            print(f"[bench] progress: {progress}", file=sys.stderr)
        stop.set()

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
            "peak_rss_mb": round(peak_rss / 2**20, 1),
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
            "cpu_ms_per_job_by_component": ComponentCpu.per_job_ms(comp0, comp_jobs, len(seen)),
            "apiserver_requests_per_job": requests_per_job(served0, served_jobs, len(seen)),
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
                "cpu_ms_per_job_by_component": "CPU ms per job of each process from t0 until "
                "the last child Job is seen (the bare runs: the same for theirs); bench = this "
                "process (its clients and watches)",
                "zero_cost_controller_jobs_per_s": "cores x 1000 / (the cluster processes' CPU "
                "ms per job in the with-submit run + the users' create clients' ms per job in "
                "the controller run): the throughput of a controller that costs no CPU and "
                "sends nothing beyond the children and one status write "
                "(zero_cost_controller_ratio: that over ceiling_jobs_per_s)",
                "apiserver_requests_per_job": "requests the API server served per job (every "
                "client: users, controller, kube-controller-manager, scheduler, kwok, this "
                "bench's watches) over the same span, by verb and resource; watches left out",
                "peak_rss_mb": "controller's peak RSS over the burst and the idle windows "
                "(peak_rss_mb_overall: the whole run, the progress phase included)",
                **(PROGRESS_DEFINITIONS if progress else {}),
            },
            "targets": {
                "throughput_ratio": ">= 0.8",
                "latency_ratio_p99": "<= 1.5",
                "peak_rss_mb": "<= 250",
                "idle_requests_per_s": "<= 1",
                **({
                    "progress_controller_cores": "< 1.0",
                    "progress_peak_rss_mb": "<= 250",
                    "progress_rejected": "== 0",
                    "progress_status_patches": "<= progress_status_patch_bound",
                    "progress_final_status_matches_last_step": "== progress_final_jobs_checked",
                } if progress else {}),
            },
            **progress,
        }
        if bare_submit:
            result.update(zero_cost_bound(bare, bare_submit, result))
        result["peak_rss_mb_overall"] = round(rss.peak / 2**20, 1)
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
        if progress:
            print(
                f"controller_scale progress: {progress['progress_posts']} posts "
                f"({progress['progress_posts_per_s']}/s, {progress['progress_rejected']} "
                f"rejected) over {progress['progress_window_s']}s: controller "
                f"{progress['progress_controller_cores']} cores "
                f"(bare server {progress.get('progress_bare_cores')}), peak RSS "
                f"{progress['progress_peak_rss_mb']} MB, p99 "
                f"{progress['progress_latency_p99_ms']} ms (bare "
                f"{progress.get('progress_bare_latency_p99_ms')} ms), status patches "
                f"{progress['progress_status_patches']} <= bound "
                f"{progress['progress_status_patch_bound']}, final status.progress "
                f"{progress['progress_final_status_matches_last_step']}/"
                f"{progress['progress_final_jobs_checked']} at the last step"
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
