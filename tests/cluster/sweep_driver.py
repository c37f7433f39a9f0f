"""Plays the trainers of a sweep: finishes trial pods with metrics from a known function
of their parameters, and reports intermediate values through the controller's endpoint
with the trial's own token (as the real trainer does)."""

from __future__ import annotations

import contextlib
import json
import math
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.cluster.controller_support import end_pod, get, items
from tests.support import Cluster


def known_loss(params: dict[str, Any]) -> float:
    """Minimum 0.5 at rank 16, learningRate 2e-4 (smooth in log space)."""
    rank = float(params.get("method.rank", 16))
    lr = float(params.get("training.learningRate", 2e-4))
    return 0.5 + 0.15 * (math.log2(rank) - 4.0) ** 2 + (math.log10(lr) - math.log10(2e-4)) ** 2


OPTIMUM = 0.5


def pod_report_token(cluster: Cluster, namespace: str, job: str) -> str:
    """KUBETUNE_REPORT_TOKEN from the pod template of the job's newest batch Job."""
    jobs = items(cluster, "job", namespace, f"kubetune.io/job={job}")
    assert jobs, f"trial {job} has no batch Job yet"
    newest = max(jobs, key=lambda j: int(j["metadata"]["labels"].get("kubetune.io/attempt", 1)))
    (container,) = newest["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container.get("env", [])}
    return str(env["KUBETUNE_REPORT_TOKEN"]["value"])


@dataclass
class Driver:
    cluster: Cluster
    namespace: str
    sweep: str
    report_url: str
    loss: Callable[[dict[str, Any]], float] = known_loss
    percent: Callable[[dict[str, Any]], float] = lambda p: 0.5
    fail_trials: Callable[[int], bool] = lambda n: False
    intermediate_steps: int = 0  # >0: report this many intermediate values before ending
    max_running: int = 0
    output: str = "s3://adapters/sweep/"  # the template's spec.output.uri (artifacts go below)
    # the base model's config.json, as each trial's pod reads it: announced to the controller
    # first, and an unreachable budget ends the trial as the trainer's gate does
    model_config: dict[str, Any] | None = None
    ended: set[str] = field(default_factory=set)
    pruned_seen: set[str] = field(default_factory=set)
    refused_in_pod: set[str] = field(default_factory=set)

    def trials(self) -> list[dict[str, Any]]:
        return items(self.cluster, "ftj", self.namespace, f"kubetune.io/sweep={self.sweep}")

    def token(self, job: str) -> str:
        """The report token the controller put in the trial's pods (as a trainer reads it)."""
        return pod_report_token(self.cluster, self.namespace, job)

    def report(self, job: str, step: int, value: float, token: str | None = None) -> dict:
        return self.post(
            job, {"step": step, "metrics": {"evalLoss": value}}, token
        )

    def post(self, job: str, doc: dict[str, Any], token: str | None = None) -> dict:
        body = json.dumps({"namespace": self.namespace, "job": job, **doc}).encode()
        req = urllib.request.Request(
            self.report_url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {token if token is not None else self.token(job)}",
            },
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def step(self) -> None:
        trials = self.trials()
        active = [
            t for t in trials if (t.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ]
        self.max_running = max(self.max_running, len(active))
        pods = items(self.cluster, "pods", self.namespace, f"kubetune.io/sweep={self.sweep}")
        by_job: dict[str, list[dict[str, Any]]] = {}
        for p in pods:
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp"):
                by_job.setdefault(p["metadata"]["labels"]["kubetune.io/job"], []).append(p)
        for t in active:
            name = t["metadata"]["name"]
            if name in self.ended or name not in by_job:
                continue
            number = int(t["metadata"]["labels"]["kubetune.io/trial"])
            params = json.loads(t["metadata"]["annotations"]["kubetune.io/trial-parameters"])
            if self.model_config is not None and self._refused_by_gate(t, by_job[name]):
                continue
            final = self.loss(params)
            pruned = False
            for s in range(1, self.intermediate_steps + 1):
                answer = self.report(name, s * 10, final + 1.0 / s)
                if answer.get("action") == "prune":
                    pruned = True
                    self.pruned_seen.add(name)
                    break
            self.ended.add(name)
            for pod in by_job[name]:
                if pruned:
                    end_pod(
                        self.cluster,
                        self.namespace,
                        pod["metadata"]["name"],
                        80,
                        {
                            "format": "kubetune.trainer/v1",
                            "status": "Pruned",
                            "exitCode": 80,
                            "reason": "Pruned",
                            "message": "pruned",
                        },
                    )
                elif self.fail_trials(number):
                    end_pod(
                        self.cluster,
                        self.namespace,
                        pod["metadata"]["name"],
                        1,
                        "RuntimeError: CUDA error: an illegal memory access",
                    )
                else:
                    end_pod(
                        self.cluster,
                        self.namespace,
                        pod["metadata"]["name"],
                        0,
                        {
                            "format": "kubetune.trainer/v1",
                            "status": "Succeeded",
                            "exitCode": 0,
                            "reason": "Succeeded",
                            "metrics": {
                                "evalLoss": final,
                                "trainableParamPercent": self.percent(params),
                            },
                            "artifact": {"uri": f"{self.output}{name}/", "sha256": "ab" * 32},
                        },
                    )

    def _refused_by_gate(self, trial: dict[str, Any], pods: list[dict[str, Any]]) -> bool:
        """What the trainer's budget gate does in a trial's first seconds: announce the model
        (attempt 1 is the model stream's step), then refuse an unreachable budget."""
        from orchestrator.api import FineTuneJobSpec
        from orchestrator.api.architectures import shape_from_config
        from orchestrator.api.budget import unreachable_budget

        name = trial["metadata"]["name"]
        self.post(name, {"step": 1, "model": self.model_config})
        spec = FineTuneJobSpec.model_validate(trial["spec"])
        shape = shape_from_config(self.model_config or {})
        reason = shape and unreachable_budget(shape, spec.method, spec.model.uri)
        if not reason:
            return False
        self.ended.add(name)
        self.refused_in_pod.add(name)
        for pod in pods:
            end_pod(self.cluster, self.namespace, pod["metadata"]["name"], 78, {
                "format": "kubetune.trainer/v1", "status": "Failed", "exitCode": 78,
                "reason": "BudgetInfeasible", "message": f"trial not trained: {reason}"})
        return True

    def run_until(
        self,
        done: Callable[[], bool],
        timeout: float = 240,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"sweep {self.sweep} did not finish: "
                    f"{get(self.cluster, 'fts', self.namespace, self.sweep).get('status')}"
                )
            # objects move under us (deleted pods, controller restarts): retry next tick
            with contextlib.suppress(Exception):
                self.step()
            if on_tick:
                on_tick()
            time.sleep(0.3)
