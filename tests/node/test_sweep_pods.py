"""A FineTuneSweep whose trials train in real pods and report their intermediate eval loss to
the controller pod through the report Service (kube-proxy, CoreDNS): the median pruner stops
the bad trials, their pods stop, and the best trial's adapter is collected."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.node.pods import RealNode
from tests.node.test_training_pods import collect, describe, job_spec, trainer_pods
from tests.support import Cluster, wait_for

pytestmark = pytest.mark.node

GOOD_LR, BAD_LR = 5e-3, 1e-9  # the bad one does not learn: its eval loss stays where it began


def diagnose(cluster: Cluster, namespace: str, controller_ns: str, trials: Any) -> str:
    """The trials, what each trainer said about its reports, and the controller's side."""
    lines = [json.dumps(trials, indent=1)]
    for t in trials:
        for pod in trainer_pods(cluster, namespace, t["name"]):
            log = cluster.kubectl(
                "logs", "-n", namespace, pod["metadata"]["name"], check=False
            ).stdout
            said = [ln for ln in log.splitlines() if "eval" in ln.lower() or "report" in ln]
            lines += [f"--- {pod['metadata']['name']}", *said[-20:]]
    log = cluster.kubectl(
        "logs",
        "-n",
        controller_ns,
        "-l",
        "app.kubernetes.io/instance=kt-node",
        "--tail=2000",
        check=False,
    ).stdout
    said = [ln for ln in log.splitlines() if "report" in ln or "prun" in ln.lower()]
    lines += ["--- controller", *said[-40:]]
    return "\n".join(lines)


def test_sweep_trials_report_through_the_service_and_bad_ones_are_pruned(
    cluster: Cluster,
    real_node: RealNode,
    node_controller: str,
    job_ns: str,
    inputs: dict[str, Any],
    tmp_path: Path,
) -> None:
    namespace, s3 = job_ns, inputs["s3"]
    template = job_spec(
        inputs["bucket"],
        distributed={"nodes": 1, "gpusPerNode": 0},
        training={
            "maxSteps": 12,
            "learningRate": GOOD_LR,
            "globalBatchSize": 4,
            "microBatchSize": 2,
            "precision": "fp32",
            "evalEvery": 4,
            "checkpointEvery": 1000,
            "seed": 7,
        },
    )
    template["output"] = {"uri": f"s3://{inputs['bucket']}/sweeps/"}
    sweep = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": "lr-sweep", "namespace": namespace},
        "spec": {
            "template": template,
            "parameters": [
                {"name": "training.learningRate", "categorical": [GOOD_LR, BAD_LR]},
                {"name": "training.seed", "categorical": [1, 2]},
            ],
            "objectives": [{"metric": "evalLoss", "direction": "minimize"}],
            # the grid's seed 5 order is good, good, bad, bad: the two good trials complete
            # as the pruner's startup trials, then each bad one is compared with their median
            "algorithm": {"sampler": "grid", "seed": 5},
            "earlyStopping": {"pruner": "median", "startupTrials": 2},
            "maxTrials": 4,
            "parallelism": 1,
            "maxFailedTrials": 1,
        },
    }
    t0 = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=json.dumps(sweep))

    def finished() -> dict[str, Any] | None:
        got = json.loads(
            cluster.kubectl("get", "fts", "-n", namespace, "lr-sweep", "-o", "json").stdout
        )
        return got if (got.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

    try:
        done = wait_for(finished, timeout=900, interval=3, what="sweep lr-sweep finished")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{describe(cluster, namespace)}") from None
    print(f"4-trial sweep in real pods finished in {time.monotonic() - t0:.0f}s")
    status = done["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    trials = status["trialList"]
    assert status["trials"]["created"] == 4, trials
    pruned = [t for t in trials if t["state"] == "Pruned"]
    # what got pruned is exactly what cannot learn
    assert sorted(t["number"] for t in pruned) == [2, 3], diagnose(
        cluster, namespace, node_controller, trials
    )
    for t in pruned:
        assert t["parameters"]["training.learningRate"] == BAD_LR
        # ... on an intermediate eval loss its pod posted to the report Service: only that
        # path stops a trial at an eval step
        ftj = json.loads(
            cluster.kubectl("get", "ftj", "-n", namespace, t["name"], "-o", "json").stdout
        )
        assert "stopped early by the" in ftj["status"]["message"]
        assert any(c.get("reason") == "TrialPruned" for c in ftj["status"]["conditions"])

        # ... and its pods stop (the trainer exits on the pruner's answer; the controller
        # deletes the trial's Job too)
        def stopped(name: str = t["name"]) -> bool:
            return not [
                p
                for p in trainer_pods(cluster, namespace, name)
                if p["status"].get("phase") in ("Pending", "Running")
            ]

        wait_for(stopped, timeout=120, interval=2, what=f"{t['name']}'s pods stopped")
    best = status["bestTrial"]
    assert best["parameters"]["training.learningRate"] == GOOD_LR

    dest = tmp_path / "best"
    collect(cluster, namespace, "lr-sweep", dest, s3, "--best")
    meta = json.loads(next(dest.rglob("kubetune.json")).read_text())
    assert meta["metrics"]["evalLoss"] == pytest.approx(best["values"][0], rel=1e-6)
