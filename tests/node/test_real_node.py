"""The real node: a kubelet with containerd, a pod network, cluster DNS and kube-proxy next to
the kwok GPU nodes, running the images built from the project's own Dockerfiles."""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.node.pods import RealNode, terminated
from tests.support import REPORT, TOOLS, Cluster, S3Bucket, wait_for

pytestmark = pytest.mark.node


def test_real_node_is_ready_next_to_the_kwok_gpu_nodes(real_node: RealNode) -> None:
    nodes = json.loads(real_node.cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    ready = {
        name: any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])
        for name, n in by_name.items()
    }
    kwok = [n for n in by_name if n.startswith("gpu-node-")]
    assert len(kwok) >= 8 and all(ready[n] for n in kwok)
    real = by_name[real_node.name]
    assert ready[real_node.name]
    # A real kubelet of the pinned version, not a kwok fake: kwok leaves this node alone.
    assert real["status"]["nodeInfo"]["kubeletVersion"] == "v1.34.4"
    assert real["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    assert "kwok.x-k8s.io/node" not in real["metadata"].get("annotations", {})
    assert real["metadata"]["labels"]["kubetune.io/real-node"] == "true"
    assert {"key": "kubetune.io/real-node", "value": "true", "effect": "NoSchedule"} in real[
        "spec"
    ]["taints"]
    # The kubelet (not kwok) holds the node's heartbeat lease.
    lease = wait_for(
        lambda: json.loads(
            real_node.cluster.kubectl(
                "get", "lease", "-n", "kube-node-lease", real_node.name, "-o", "json"
            ).stdout
        ),
        timeout=60,
        what="the real node's lease",
    )
    assert lease["spec"]["holderIdentity"] == real_node.name
    print(real_node.cluster.kubectl("get", "nodes", "-o", "wide").stdout)


def test_trainer_image_runs_the_trainer_stack(real_node: RealNode, namespace: str) -> None:
    # Through the image's entrypoint (tini -> kubetune-train), as the controller runs it.
    probe = (
        "import torch, deepspeed, peft, transformers, orchestrator.trainer; "
        "print('trainer-stack', torch.__version__, peft.__version__, transformers.__version__)"
    )
    real_node.apply(
        namespace,
        real_node.pod("trainer", real_node.image("trainer"), args=["python", "-c", probe]),
    )
    pod = real_node.wait_finished(namespace, "trainer", timeout=300)
    state = terminated(pod)
    assert state["exitCode"] == 0, real_node.logs(namespace, "trainer")
    assert "trainer-stack 2.15.0" in real_node.logs(namespace, "trainer")


def test_controller_image_has_no_torch(real_node: RealNode, namespace: str) -> None:
    probe = (
        "import importlib.util, sys, orchestrator.controller; "
        "sys.exit(7 if importlib.util.find_spec('torch') else 0)"
    )
    real_node.apply(
        namespace,
        real_node.pod("ctl", real_node.image("controller"), command=["python", "-c", probe]),
    )
    pod = real_node.wait_finished(namespace, "ctl")
    assert terminated(pod)["exitCode"] == 0, real_node.logs(namespace, "ctl")


def test_termination_message_and_exit_code_from_the_kubelet(
    real_node: RealNode, namespace: str
) -> None:
    real_node.apply(
        namespace,
        real_node.pod(
            "exit3",
            real_node.image("base"),
            command=["sh", "-c", "printf 'bye from exit3' > /dev/termination-log; exit 3"],
        ),
    )
    pod = real_node.wait_finished(namespace, "exit3")
    state = terminated(pod)
    assert pod["status"]["phase"] == "Failed"
    assert state["exitCode"] == 3
    assert state["message"] == "bye from exit3"


# Each peer serves one TCP message, resolves the other's headless-Service FQDN, sends it its
# name and prints the reply; it exits 0 once it has both sent and served.
PEER = r"""
import os, socket, sys, threading, time
me, peer, sub, ns = sys.argv[1:5]
served = threading.Event()
srv = socket.create_server(("", 7000))
def serve():
    conn, _ = srv.accept()
    msg = conn.recv(200).decode()
    conn.sendall(f"ack:{me}:{msg}".encode()); conn.close(); served.set()
threading.Thread(target=serve, daemon=True).start()
fqdn = f"{peer}.{sub}.{ns}.svc.cluster.local"
deadline = time.time() + 90
while True:
    try:
        ip = socket.gethostbyname(fqdn)
        with socket.create_connection((ip, 7000), timeout=5) as s:
            s.sendall(f"hello-from-{me}".encode()); reply = s.recv(200).decode()
        break
    except OSError as exc:
        if time.time() > deadline:
            print("FAILED", fqdn, exc, flush=True); sys.exit(1)
        time.sleep(0.3)
print("RESOLVED", fqdn, ip, flush=True)
print("REPLY", reply, flush=True)
sys.exit(0 if served.wait(90) else 2)
"""


def test_headless_service_dns_and_pod_to_pod_tcp(real_node: RealNode, namespace: str) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "peers"},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"app": "peer"},
            "ports": [{"name": "p", "port": 7000}],
        },
    }
    pods = [
        real_node.pod(
            me,
            real_node.image("base"),
            command=["python3", "-c", PEER, me, peer, "peers", namespace],
            labels={"app": "peer"},
            hostname=me,
            subdomain="peers",
        )
        for me, peer in (("a", "b"), ("b", "a"))
    ]
    real_node.apply(namespace, service, *pods)
    done = {name: real_node.wait_finished(namespace, name) for name in ("a", "b")}
    for me, peer in (("a", "b"), ("b", "a")):
        logs = real_node.logs(namespace, me)
        assert terminated(done[me])["exitCode"] == 0, logs
        peer_ip = done[peer]["status"]["podIP"]
        assert f"RESOLVED {peer}.peers.{namespace}.svc.cluster.local {peer_ip}" in logs
        assert f"REPLY ack:{peer}:hello-from-{me}" in logs


CLIENT = r"""
import hashlib, os, sys, time, urllib.error, urllib.request
import boto3

def get(url):
    # kube-proxy applies a new endpoint on its next sync (about a second after the
    # EndpointSlice turns ready); until then the ClusterIP rejects, like any real client
    # would see right after a rollout.
    deadline = time.monotonic() + 30
    while True:
        try:
            return urllib.request.urlopen(url, timeout=10).read().decode().strip()
        except urllib.error.URLError as err:
            if time.monotonic() > deadline or not isinstance(err.reason, ConnectionRefusedError):
                raise
            time.sleep(0.5)

web = f"http://web.{os.environ['NS']}.svc.cluster.local/index.txt"
print("SERVICE", get(web), flush=True)
print("CLUSTERIP", get(f"http://{os.environ['WEB_IP']}/index.txt"), flush=True)
s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT"], region_name="us-east-1")
body = os.urandom(1 << 20)
s3.put_object(Bucket=os.environ["BUCKET"], Key="from-pod.bin", Body=body)
back = s3.get_object(Bucket=os.environ["BUCKET"], Key="from-pod.bin")["Body"].read()
assert back == body
print("S3", hashlib.sha256(body).hexdigest(), flush=True)
"""


def test_cluster_ip_service_and_s3_from_a_pod(real_node: RealNode, namespace: str) -> None:
    web = real_node.pod(
        "web",
        real_node.image("base"),
        command=[
            "sh",
            "-c",
            "mkdir -p /srv && echo hello-through-kube-proxy > /srv/index.txt && "
            "exec python3 -m http.server 8080 --directory /srv",
        ],
        labels={"app": "web"},
    )
    web["spec"]["terminationGracePeriodSeconds"] = 0
    web["spec"]["containers"][0]["readinessProbe"] = {
        "tcpSocket": {"port": 8080},
        "periodSeconds": 1,
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    real_node.apply(namespace, web, service)
    cluster_ip = json.loads(
        real_node.cluster.kubectl("get", "svc", "-n", namespace, "web", "-o", "json").stdout
    )["spec"]["clusterIP"]
    real_node.wait_running(namespace, "web")
    real_node.wait_service_ready(namespace, "web")

    bucket = S3Bucket(
        real_node.env["S3_ENDPOINT_HOST"],
        real_node.env["AWS_ACCESS_KEY_ID"],
        real_node.env["AWS_SECRET_ACCESS_KEY"],
        "us-east-1",
        f"kt-{uuid.uuid4().hex[:10]}",
    )
    bucket.client().create_bucket(Bucket=bucket.bucket)
    client = real_node.pod(
        "client",
        real_node.image("controller"),
        command=["python", "-c", CLIENT],
        env={
            "NS": namespace,
            "WEB_IP": cluster_ip,
            "S3_ENDPOINT": real_node.env["S3_ENDPOINT"],
            "BUCKET": bucket.bucket,
            "AWS_ACCESS_KEY_ID": real_node.env["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": real_node.env["AWS_SECRET_ACCESS_KEY"],
        },
    )
    real_node.apply(namespace, client)
    pod = real_node.wait_finished(namespace, "client")
    logs = real_node.logs(namespace, "client")
    assert terminated(pod)["exitCode"] == 0, logs
    assert "SERVICE hello-through-kube-proxy" in logs
    assert "CLUSTERIP hello-through-kube-proxy" in logs
    # What the pod stored is on the server, as this machine sees it.
    stored = bucket.client().get_object(Bucket=bucket.bucket, Key="from-pod.bin")["Body"].read()
    assert f"S3 {hashlib.sha256(stored).hexdigest()}" in logs


def _leftovers() -> dict[str, list[str]]:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    devices = [
        line.split(": ")[1].split("@")[0]
        for line in links.splitlines()
        if line.split(": ")[1].startswith(("cni", "veth", "ktbr"))
    ]
    procs = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    agents = [
        p
        for p in procs.splitlines()
        if any(f"/{b} " in p or p.startswith(f"{b} ") for b in ("kubelet", "kube-proxy", "coredns"))
        or p.startswith("containerd ")
        or "containerd-shim" in p
    ]
    mounts = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if "/kubetune-node/" in line.split()[4] or "/.cache/kubetune/node/" in line.split()[4]
    ]
    chains = [
        line
        for line in subprocess.run(
            ["iptables-save"], capture_output=True, text=True
        ).stdout.splitlines()
        if line.startswith((":KUBE-", ":CNI-"))
    ]
    return {"devices": devices, "agents": agents, "mounts": mounts, "chains": chains}


def test_down_leaves_nothing_behind_and_up_works_again(
    real_node: RealNode, cluster: Cluster, namespace: str
) -> None:
    # A pod is running while the node goes down: its sandbox, veth and mounts must go too.
    real_node.apply(
        namespace, real_node.pod("sleeper", real_node.image("base"), command=["sleep", "600"])
    )
    real_node.wait_running(namespace, "sleeper")
    before = _leftovers()
    assert before["devices"] and before["agents"] and before["mounts"]
    # What `up` recorded of the host before it changed anything.
    baseline = Path(f"/run/kubetune-node/{real_node.name}/baseline").read_text().splitlines()
    sysctls = dict(line.split()[1:3] for line in baseline if line.startswith("sysctl "))
    assert "net.ipv4.ip_forward" in sysctls

    down = subprocess.run(
        [str(TOOLS / "node.sh"), "down"], capture_output=True, text=True, timeout=300
    )
    assert down.returncode == 0, down.stderr
    assert _leftovers() == {"devices": [], "agents": [], "mounts": [], "chains": []}
    assert not Path("/run/kubetune-node").exists()
    for key, value in sysctls.items():
        current = Path("/proc/sys", *key.split(".")).read_text().strip()
        assert current == value, f"{key} is {current}, was {value} before the node started"

    up = subprocess.run(
        [str(TOOLS / "node.sh"), "up", cluster.kubeconfig],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert up.returncode == 0, up.stderr
    REPORT["real node restart"] = up.stderr.strip().splitlines()[-1]
    real_node.apply(
        namespace,
        real_node.pod("again", real_node.image("base"), command=["python3", "-c", "print('up')"]),
    )
    assert terminated(real_node.wait_finished(namespace, "again"))["exitCode"] == 0
