"""The test control plane itself: scheduler GPU accounting, the Job controller,
garbage collection, CRD validation and helm — all real components, nothing mocked."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.support import Cluster, tool, wait_for

pytestmark = pytest.mark.cluster


def _pods(cluster: Cluster, namespace: str, selector: str) -> list[dict]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    return json.loads(out)["items"]


def _gpu_job(name: str, gpus: int, completions: int) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "example.invalid/trainer:1",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ],
                },
            },
        },
    }


def test_indexed_gpu_job_schedules_runs_and_completes(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(_gpu_job("gang", gpus=8, completions=2)),
    )

    def running() -> list[dict] | None:
        pods = _pods(cluster, namespace, "app=gang")
        ok = len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods)
        return pods if ok else None

    pods = wait_for(running, timeout=60, what="both gang pods Running")
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert len(nodes) == 2, f"8-GPU pods must land on different 8-GPU nodes, got {nodes}"
    indexes = sorted(
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods
    )
    assert indexes == ["0", "1"]

    # Play the kubelet: both containers exit 0.
    for p in pods:
        cluster.kubectl(
            "annotate",
            "pod",
            "-n",
            namespace,
            p["metadata"]["name"],
            "kubetune.io/test-exit-code=0",
            'kubetune.io/test-message={"ok":1}',
        )

    def complete() -> bool:
        job = json.loads(
            cluster.kubectl("get", "job", "gang", "-n", namespace, "-o", "json").stdout
        )
        conds = {c["type"]: c["status"] for c in job["status"].get("conditions", [])}
        return conds.get("Complete") == "True"

    wait_for(complete, timeout=60, what="Job Complete")
    done = _pods(cluster, namespace, "app=gang")
    term = [p["status"]["containerStatuses"][0]["state"]["terminated"] for p in done]
    assert all(t["exitCode"] == 0 and t["message"] == '{"ok":1}' for t in term)


def test_failed_exit_code_and_message_reach_container_status(
    cluster: Cluster, namespace: str
) -> None:
    cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(_gpu_job("fails", gpus=1, completions=1)),
    )
    pod = wait_for(
        lambda: [
            p
            for p in _pods(cluster, namespace, "app=fails")
            if p["status"].get("phase") == "Running"
        ],
        timeout=60,
    )[0]
    cluster.kubectl(
        "annotate",
        "pod",
        "-n",
        namespace,
        pod["metadata"]["name"],
        "kubetune.io/test-exit-code=3",
        "kubetune.io/test-message=CUDA OOM",
    )

    def failed() -> dict | None:
        job = json.loads(
            cluster.kubectl("get", "job", "fails", "-n", namespace, "-o", "json").stdout
        )
        conds = {c["type"]: c for c in job["status"].get("conditions", [])}
        return conds.get("Failed") if conds.get("Failed", {}).get("status") == "True" else None

    cond = wait_for(failed, timeout=60, what="Job Failed")
    assert cond["reason"] == "BackoffLimitExceeded"
    state = _pods(cluster, namespace, "app=fails")[0]["status"]["containerStatuses"][0]["state"]
    assert state["terminated"]["exitCode"] == 3
    assert state["terminated"]["message"] == "CUDA OOM"


def test_nine_gpus_stay_pending_with_scheduler_reason(cluster: Cluster, namespace: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "too-big"},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "example.invalid/x:1",
                    "resources": {"limits": {"nvidia.com/gpu": "9"}},
                }
            ]
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))

    def unschedulable() -> str | None:
        p = json.loads(
            cluster.kubectl("get", "pod", "too-big", "-n", namespace, "-o", "json").stdout
        )
        for c in p["status"].get("conditions", []):
            if c["type"] == "PodScheduled" and c["status"] == "False":
                return str(c.get("message", ""))
        return None

    message = wait_for(unschedulable, timeout=60, what="PodScheduled=False")
    assert "Insufficient nvidia.com/gpu" in message
    p = json.loads(cluster.kubectl("get", "pod", "too-big", "-n", namespace, "-o", "json").stdout)
    assert p["status"]["phase"] == "Pending"


def test_deleting_a_job_garbage_collects_its_pods(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(_gpu_job("doomed", gpus=2, completions=2)),
    )
    wait_for(lambda: len(_pods(cluster, namespace, "app=doomed")) == 2, timeout=60)
    cluster.kubectl("delete", "job", "doomed", "-n", namespace, "--cascade=background")
    wait_for(
        lambda: _pods(cluster, namespace, "app=doomed") == [],
        timeout=90,
        what="pods removed after the Job was deleted",
    )


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.foundation.kubetune.io"},
    "spec": {
        "group": "foundation.kubetune.io",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1, "maximum": 8}
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}


def test_crd_schema_rejects_invalid_objects(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(CRD))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/widgets.foundation.kubetune.io", "--timeout=30s"
    )

    def apply(size: object) -> subprocess.CompletedProcess[str]:
        obj = {
            "apiVersion": "foundation.kubetune.io/v1",
            "kind": "Widget",
            "metadata": {"name": f"w{size}"},
            "spec": {"size": size},
        }
        return cluster.kubectl(
            "apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False
        )

    assert wait_for(lambda: apply(4).returncode == 0, timeout=30, what="valid widget accepted")
    bad = apply(9)
    assert bad.returncode != 0
    assert "spec.size" in bad.stderr and "less than or equal to 8" in bad.stderr
    assert apply("big").returncode != 0


def test_helm_template_and_install(cluster: Cluster, namespace: str, tmp_path) -> None:
    chart = str(__import__("pathlib").Path(__file__).parent / "testdata" / "minichart")
    env = {"KUBECONFIG": cluster.kubeconfig, "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    rendered = subprocess.run(
        [tool("helm"), "template", "demo", chart, "--set", "greeting=hi"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    cm = yaml.safe_load(rendered)
    assert cm["data"]["greeting"] == "hi"

    subprocess.run(
        [tool("helm"), "install", "demo", chart, "-n", namespace, "--wait", "--timeout", "60s"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    got = json.loads(
        cluster.kubectl("get", "configmap", "demo-greeting", "-n", namespace, "-o", "json").stdout
    )
    assert got["data"]["greeting"] == "hello"
    listed = subprocess.run(
        [tool("helm"), "list", "-n", namespace, "-o", "json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert json.loads(listed)[0]["status"] == "deployed"


def test_components_report_real_versions(cluster: Cluster) -> None:
    out = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    from tests.support import versions

    want = versions()["KUBERNETES_VERSION"]
    assert out["serverVersion"]["gitVersion"] == want
    assert out["clientVersion"]["gitVersion"] == want
