"""The controller's shape against the real control plane: server-side selectors on every
child watch, live progress in status, and a report endpoint a flood cannot stall."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request

import psutil
import pytest

from tests.cluster.controller_support import ControllerProcess, get, items
from tests.cluster.sweep_driver import Driver, pod_report_token
from tests.cluster.test_finetunejob import _apply, _job, _secret
from tests.cluster.test_finetunesweep import _apply as _apply_sweep
from tests.cluster.test_finetunesweep import _sweep
from tests.support import Cluster, wait_for

pytestmark = pytest.mark.cluster


def _watch_events(cluster: Cluster, resource: str) -> float:
    """Events the API server has sent to all watchers of `resource`."""
    text = cluster.kubectl("get", "--raw", "/metrics").stdout
    pat = re.compile(r'^apiserver_watch_events_total\{[^}]*resource="' + resource + r'"[^}]*\}'
                     r"\s+([0-9.e+]+)$")
    return sum(float(m.group(1)) for line in text.splitlines() if (m := pat.match(line)))


def _settled_delta(cluster: Cluster, resource: str, create: object) -> float:
    before = _watch_events(cluster, resource)
    create()  # type: ignore[operator]
    time.sleep(3)  # every watcher has its events by now (all on loopback)
    return _watch_events(cluster, resource) - before


def _bare_job(name: str, labels: dict[str, str]) -> str:
    return json.dumps({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {"suspend": True, "template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}}},
    })


def test_child_watches_carry_a_server_side_label_selector(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    # Two identical suspended Jobs, one foreign, one labelled managed-by=kubetune (but of no
    # FineTuneJob): the API server sends the labelled one to one watcher more — the
    # controller's — and the foreign one not to the controller at all. Without a server-side
    # selector both deltas would be equal.
    def create(prefix: str, labels: dict[str, str]) -> object:
        docs = [json.loads(_bare_job(f"{prefix}-{i}", labels)) for i in range(N)]
        return lambda: cluster.kubectl(
            "apply", "-n", namespace, "-f", "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
        )

    N = 10  # per kind: enough that other activity in the cluster cannot flip the comparison
    time.sleep(2)  # let earlier tests' events drain
    foreign = _settled_delta(cluster, "jobs", create("foreign", {"app": "other"}))
    ours = _settled_delta(
        cluster, "jobs", create("labelled", {"app.kubernetes.io/managed-by": "kubetune"})
    )
    assert foreign >= N, "no watch events counted: metric name changed?"
    # each labelled Job reaches one watcher more (the controller's): at least N more events
    assert ours - foreign >= N - 2, (foreign, ours)


def _report(url: str, body: dict, token: str) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _api_requests(controller: ControllerProcess) -> float:
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{controller.metrics_port}/metrics", timeout=5
    ).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kubetune_api_requests_total{")
    )


def test_progress_reaches_status_coalesced_and_forged_reports_cost_no_api_call(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    _apply_sweep(cluster, namespace, _sweep("live", maxTrials=1, parallelism=1))
    driver = Driver(cluster, namespace, "live", controller.report_url)
    wait_for(lambda: items(cluster, "pods", namespace, "kubetune.io/job=live-0"), timeout=30,
             what="trial pod")
    token = driver.token("live-0")
    body = {"namespace": namespace, "job": "live-0", "metrics": {"evalLoss": 2.0},
            "progress": {"totalSteps": 500, "epoch": 0.2, "trainLoss": 2.5,
                         "tokensPerSecond": 1234.5, "etaSeconds": 600}}
    assert _report(controller.report_url, {**body, "step": 100}, token)[0] == 200

    def progress() -> dict | None:
        return (get(cluster, "ftj", namespace, "live-0").get("status") or {}).get("progress")

    shown = wait_for(lambda: (p := progress()) and p.get("step") == 100 and p, timeout=15,
                     what="status.progress")
    assert shown["totalSteps"] == 500 and shown["tokensPerSecond"] == pytest.approx(1234.5)
    assert shown["trainLoss"] == pytest.approx(2.5) and shown["etaSeconds"] == 600
    header, row = cluster.kubectl("get", "ftj", "live-0", "-n", namespace).stdout.splitlines()
    assert "PROGRESS" in header and "100/500" in row.split()

    # a second report within 30 s is coalesced: status keeps the first for now
    assert _report(controller.report_url, {**body, "step": 120}, token)[0] == 200
    time.sleep(3)
    assert progress()["step"] == 100  # type: ignore[index]

    # forged, foreign and replayed reports: one 403 each, and no API call for any of them
    before = _api_requests(controller)
    answers = [
        _report(controller.report_url, {**body, "step": 130}, token[:-2] + "xx"),
        _report(controller.report_url, {**body, "step": 120}, token),  # replay
        _report(controller.report_url, {**body, "job": "nope", "step": 200}, token),
        _report(controller.report_url, {**body, "namespace": "kube-system", "step": 200}, token),
    ] * 10
    assert {json.dumps(a) for a in answers} == {json.dumps([403, {"error": "forbidden"}])}
    assert _api_requests(controller) - before <= 2  # (an unrelated resync write at most)


def test_any_job_posts_its_own_progress_and_nothing_else(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    """A plain FineTuneJob's pods carry a progress token (derived from the controller's key
    and the job's uid): it writes that job's status.progress and nothing else: not another
    job's, and its metrics reach no study."""
    _secret(cluster, namespace)
    for name in ("plain", "other"):
        _apply(cluster, namespace, _job(name, nodes=1))
    for name in ("plain", "other"):
        wait_for(lambda n=name: items(cluster, "job", namespace, f"kubetune.io/job={n}"),
                 timeout=30, what=f"{name}'s batch Job")
    token = pod_report_token(cluster, namespace, "plain")
    config = json.loads(get(cluster, "configmap", namespace, "plain-a1-config")["data"][
        "config.json"])
    assert config["progress"]["url"] == controller.report_url
    assert token not in json.dumps(config)  # the token is in the pod env only
    body = {"namespace": namespace, "job": "plain", "step": 40,
            "metrics": {"evalLoss": 0.01},
            "progress": {"totalSteps": 400, "epoch": 0.1, "trainLoss": 3.25,
                         "tokensPerSecond": 512.0, "etaSeconds": 90}}
    assert _report(controller.report_url, body, token) == (200, {"action": "continue"})

    def progress() -> dict | None:
        return (get(cluster, "ftj", namespace, "plain").get("status") or {}).get("progress")

    shown = wait_for(lambda: (p := progress()) and p.get("step") == 40 and p, timeout=15,
                     what="status.progress of a plain job")
    assert shown["totalSteps"] == 400 and shown["trainLoss"] == pytest.approx(3.25)
    assert shown["evalLoss"] == pytest.approx(0.01)  # shown, but never told to a study
    # the token is this job's only: another job's progress refuses it
    assert _report(controller.report_url, {**body, "job": "other", "step": 41}, token)[0] == 403
    other = pod_report_token(cluster, namespace, "other")
    assert other != token
    assert _report(controller.report_url, {**body, "step": 42}, other)[0] == 403


def test_report_flood_does_not_stop_reconciliation(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    _secret(cluster, namespace)
    host, port = "127.0.0.1", controller.report_port
    idle: list[socket.socket] = []
    slow: list[socket.socket] = []
    try:
        for _ in range(1000):
            idle.append(socket.create_connection((host, port), timeout=5))
        for _ in range(100):
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(b"POST /report HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 60000\r\n\r\n{")
            slow.append(s)
        t0 = time.monotonic()
        _apply(cluster, namespace, _job("during-flood", nodes=1))
        wait_for(lambda: get(cluster, "job", namespace, "during-flood-a1"), timeout=15,
                 what="Job created during the flood")
        elapsed = time.monotonic() - t0
        assert controller.proc is not None and controller.proc.poll() is None
        rss_mb = psutil.Process(controller.proc.pid).memory_info().rss / 2**20
        assert rss_mb < 250, rss_mb
        # slow bodies are cut off after the body deadline, not held for ever
        time.sleep(11)
        cut = 0
        for s in slow:
            s.settimeout(0.5)
            try:
                data = s.recv(4096)
                cut += 1 if (data == b"" or data.startswith(b"HTTP/1.1 408")) else 0
            except OSError:
                cut += 1
        assert cut == len(slow), f"{cut}/{len(slow)} slow connections cut"
        # the endpoint still answers
        code, _ = _report(controller.report_url, {"namespace": namespace, "job": "x", "step": 1},
                          "kt1.forged")
        assert code == 403
        print(f"Job created {elapsed:.2f}s into a 1,100-connection flood; RSS {rss_mb:.0f} MB")
    finally:
        for s in idle + slow:
            s.close()
