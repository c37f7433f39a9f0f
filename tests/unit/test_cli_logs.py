"""`kubetune logs JOB [--attempt N] [--rank R] [-f] [--tail N]` against an in-memory API:
which pod is read (the current attempt by default, failed attempts the controller kept),
and one clear line when the attempt or rank has no pod left."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

import orchestrator.cli.main as cli
from orchestrator.client import Client
from orchestrator.local import LocalClient
from orchestrator.local.state import LocalState

pytestmark = pytest.mark.unit

INDEX = "batch.kubernetes.io/job-completion-index"


def _pod(job: str, attempt: int, rank: int, phase: str = "Failed") -> Any:
    return SimpleNamespace(
        metadata=SimpleNamespace(
            name=f"{job}-a{attempt}-{rank}-abcde",
            labels={"kubetune.io/job": job, "kubetune.io/attempt": str(attempt),
                    "app.kubernetes.io/component": "trainer", INDEX: str(rank)},
            annotations={INDEX: str(rank)},
            creation_timestamp=f"2025-01-01T00:0{attempt}:00Z",
        ),
        status=SimpleNamespace(phase=phase),
    )


class _Stream:
    def __init__(self, text: str) -> None:
        self.text = text

    def stream(self, amt: int, decode_content: bool) -> Iterator[bytes]:
        data = self.text.encode()
        for i in range(0, len(data), 7):  # chunks that split lines
            yield data[i:i + 7]


class FakeCore:
    def __init__(self, pods: list[Any]) -> None:
        self.pods = pods
        self.reads: list[tuple[str, dict[str, Any]]] = []
        self.selectors: list[str] = []
        self.fail_read: ApiException | None = None

    def list_namespaced_pod(self, namespace: str, label_selector: str) -> Any:
        self.selectors.append(label_selector)
        want = dict(kv.split("=", 1) for kv in label_selector.split(","))
        return SimpleNamespace(items=[p for p in self.pods if all(
            p.metadata.labels.get(k) == v for k, v in want.items())])

    def read_namespaced_pod_log(self, name: str, namespace: str, **kw: Any) -> _Stream:
        if self.fail_read is not None:
            raise self.fail_read
        self.reads.append((name, kw))
        return _Stream(f"log of {name}\nstep 10 loss 1.5\nlast line")


class FakeCustom:
    def __init__(self, jobs: dict[str, dict[str, Any]]) -> None:
        self.jobs = jobs

    def get_namespaced_custom_object(self, group: str, version: str, ns: str, plural: str,
                                     name: str) -> dict[str, Any]:
        if plural == "finetunejobs" and name in self.jobs:
            return self.jobs[name]
        exc = ApiException(status=404, reason="Not Found")
        exc.body = json.dumps({"message": f'{plural} "{name}" not found'})
        raise exc


def _ftj(name: str, attempts: int, phase: str = "Running") -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "ml"},
            "status": {"attempts": attempts, "phase": phase}}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeCore:
    # attempt 3 runs (2 ranks); attempt 1 failed on rank 1 (rank 0 was stopped and deleted
    # by Kubernetes); attempt 2's Job was pruned by the controller's retention
    core = FakeCore([_pod("ft", 1, 1), _pod("ft", 3, 0, "Running"), _pod("ft", 3, 1, "Running"),
                     _pod("other", 1, 0)])
    client = Client("ml", api_client=object())
    client.core = core
    client.custom = FakeCustom({"ft": _ftj("ft", 3), "fresh": _ftj("fresh", 1, "Pending")})
    monkeypatch.setattr(cli, "_client", lambda o: client)
    return core


def run(capsys: pytest.CaptureFixture[str], *args: str, prog: str = "kubetune"
        ) -> tuple[int, str, str]:
    code = cli.main(list(args), prog=prog)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, prog: str = "kubetune") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def test_default_is_rank_0_of_the_current_attempt(capsys: pytest.CaptureFixture[str],
                                                  api: FakeCore) -> None:
    code, out, err = run(capsys, "logs", "ft", "--tail", "50")
    assert code == 0, err
    assert out.splitlines() == ["log of ft-a3-0-abcde", "step 10 loss 1.5", "last line"]
    name, kw = api.reads[0]
    assert name == "ft-a3-0-abcde"
    assert kw["tail_lines"] == 50 and kw["container"] == "trainer" and kw["follow"] is False
    # only this job's trainer pods are listed
    assert api.selectors == ["kubetune.io/job=ft,app.kubernetes.io/component=trainer"]


def test_a_failed_attempt_and_rank(capsys: pytest.CaptureFixture[str], api: FakeCore) -> None:
    code, out, err = run(capsys, "logs", "ft", "--attempt", "1", "--rank", "1", "-f")
    assert code == 0, err
    assert api.reads == [("ft-a1-1-abcde", {"container": "trainer", "follow": True,
                                            "_preload_content": False})]
    assert out.startswith("log of ft-a1-1-abcde\n")
    code, _, _ = run(capsys, "logs", "ft", "-a", "3", "-r", "1")
    assert code == 0 and api.reads[-1][0] == "ft-a3-1-abcde"


@pytest.mark.parametrize(("args", "message"), [
    (["--attempt", "2"], "attempt 2 of FineTuneJob ft has no pods left (the controller keeps "
                         "the pods of the last few failed attempts, for a limited time); "
                         "attempts with logs: 1, 3 (pass --attempt N)"),
    (["--attempt", "7"], "FineTuneJob ft has no attempt 7: it has had 3 attempt(s); attempts "
                         "with logs: 1, 3"),
    (["--attempt", "1"], "attempt 1 of FineTuneJob ft has no pod of rank 0; ranks with logs: 1"),
    (["--rank", "4"], "attempt 3 of FineTuneJob ft has no pod of rank 4; ranks with logs: 0, 1"),
])
def test_a_missing_attempt_or_rank_names_what_is_left(
        capsys: pytest.CaptureFixture[str], api: FakeCore, args: list[str], message: str) -> None:
    code, out, err = run(capsys, "logs", "ft", *args)
    assert code == 1 and out == ""
    assert message in one_line(err)
    assert api.reads == []


def test_a_job_whose_pods_do_not_exist_yet(capsys: pytest.CaptureFixture[str],
                                           api: FakeCore) -> None:
    code, _, err = run(capsys, "logs", "fresh")
    assert code == 1
    assert one_line(err).endswith(
        "attempt 1 (the current one) of FineTuneJob fresh has no pods yet (phase Pending); "
        "no attempt has pods left")


def test_usage_errors_and_the_plugin_name(capsys: pytest.CaptureFixture[str],
                                          api: FakeCore) -> None:
    code, _, err = run(capsys, "logs", "ft", "--attempt", "0")
    assert code == 2 and "--attempt" in one_line(err)
    # `kubectl tune …` is the same program (the kubectl-tune console script); errors say so
    assert cli._prog("/usr/local/bin/kubectl-tune") == "kubectl tune"
    code, _, err = run(capsys, "logs", "ft", "--attempt", "9", prog="kubectl tune")
    assert code == 1 and "has no attempt 9" in one_line(err, "kubectl tune")


def test_a_server_error_names_the_pod(capsys: pytest.CaptureFixture[str], api: FakeCore) -> None:
    exc = ApiException(status=400, reason="Bad Request")
    exc.body = json.dumps({"message": 'container "trainer" in pod "ft-a3-0-abcde" is waiting '
                                      "to start: ContainerCreating"})
    api.fail_read = exc
    code, _, err = run(capsys, "logs", "ft")
    assert code == 1
    assert "cannot read the log of pod ft-a3-0-abcde (attempt 3, rank 0): container" in (
        one_line(err))


def test_local_runs_keep_one_log_per_attempt(tmp_path: Path) -> None:
    state = LocalState(tmp_path)
    state.save("finetunejobs", _ftj("loc", 2, "Failed"))
    for attempt in (1, 2):
        path = state.log_path("loc", attempt)
        path.parent.mkdir(parents=True)
        path.write_text(f"attempt {attempt}\n")
    client = LocalClient(state)
    assert list(client.logs("loc")) == ["attempt 2"]
    assert list(client.logs("loc", attempt=1)) == ["attempt 1"]
    with pytest.raises(Exception, match="no local log of attempt 3; attempts with logs: 1, 2"):
        list(client.logs("loc", attempt=3))
    with pytest.raises(Exception, match="one log for all ranks"):
        list(client.logs("loc", rank=1))
