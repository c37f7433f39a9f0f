"""Local mode end to end: `kubetune sweep --local` with real training (torchrun, DeepSpeed,
a tiny Llama built here) writing adapters to the S3 server. Ctrl-C in the middle of a trial
stops every process; running the same command again resumes and the sweep ends with exactly
maxTrials trials, the finished ones never run twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from demo import assets
from tests.support import REPO, S3Bucket, wait_for

pytestmark = pytest.mark.e2e
MAX_TRIALS = 3


def live_processes_under(path: Path) -> list[int]:
    """pids whose command line mentions ``path`` (the trainers read configs from there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if str(path) in cmd and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    assets.build(out, name="resume", max_trials=MAX_TRIALS, pretrain_steps=30)
    return out


def sweep_file(tiny: Path, s3: S3Bucket, tmp: Path) -> Path:
    doc = yaml.safe_load((tiny / "sweep.yaml").read_text())
    spec = doc["spec"]
    spec["template"]["output"] = {"uri": f"s3://{s3.bucket}/adapters/"}
    spec["template"]["training"].update({"maxSteps": 16, "evalEvery": 4, "checkpointEvery": 4})
    # This test is about resuming: one objective and no forgetting constraint (the demo's
    # sweep has both), so "best" is simply the lowest eval loss.
    spec.pop("constraints", None)
    spec["objectives"] = [{"metric": "evalLoss", "direction": "minimize"}]
    spec.update({"maxTrials": MAX_TRIALS, "parallelism": 1,
                 "algorithm": {"sampler": "random", "seed": 11},
                 # a region where every budget is reachable: no trial is refused
                 "parameters": [
                     {"name": "method.rank", "int": {"low": 4, "high": 8}},
                     {"name": "method.trainableParamPercent", "float": {"low": 3.0,
                                                                        "high": 5.0}}]})
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def cli(state: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "--state-dir", str(state), *args]


def env(s3: S3Bucket) -> dict[str, str]:
    e = dict(os.environ)
    e.update(s3.env())
    e.update({"COLUMNS": "220", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    return e


def job_status(state: Path, name: str) -> dict[str, Any]:
    try:
        doc = json.loads((state / "objects" / "finetunejobs" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc.get("status") or {}


def test_sigint_mid_sweep_then_resume_ends_with_exactly_max_trials(
    tiny: Path, s3: S3Bucket, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    spec = sweep_file(tiny, s3, tmp_path)
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(cli(state, "sweep", str(spec), "--local", "--nproc", "1"),
                             cwd=REPO, env=env(s3), stdout=log, stderr=subprocess.STDOUT)
    try:
        # Ctrl-C while trial 1 trains (after trial 0 finished)
        wait_for(lambda: (job_status(state, "resume-1").get("progress") or {}).get("step", 0)
                 >= 4 or first.poll() is not None, timeout=300, interval=0.2,
                 what="trial 1 training")
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        first.send_signal(signal.SIGINT)
        code = first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    output = (tmp_path / "first.log").read_text()
    assert code == 130, output
    assert output.strip().splitlines()[-1].startswith("kubetune: error: interrupted")
    assert "Traceback" not in output
    # every trainer process (torchrun and its workers) is gone
    wait_for(lambda: not live_processes_under(state), timeout=20, what="trainers stopped")
    assert job_status(state, "resume-0")["phase"] == "Succeeded"
    assert job_status(state, "resume-1")["phase"] == "Pending"
    sweep = json.loads((state / "objects" / "finetunesweeps" / "resume.json").read_text())
    assert sweep["status"]["phase"] == "Pending"
    assert sweep["status"]["trials"]["created"] == 2

    second = subprocess.run(cli(state, "sweep", str(spec), "--local", "--nproc", "1"),
                            cwd=REPO, env=env(s3), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming sweep resume: 1 of 3 trials finished, 1 to relaunch" in second.stdout
    assert "trial 1 (resume-1) resumed" in second.stdout

    rows = json.loads(subprocess.run(cli(state, "get", "trials", "resume", "--local", "-o",
                                         "json"), cwd=REPO, env=env(s3), capture_output=True,
                                     text=True, timeout=60).stdout)
    assert [r["number"] for r in rows] == list(range(MAX_TRIALS))
    assert [r["name"] for r in rows] == [f"resume-{n}" for n in range(MAX_TRIALS)]
    assert all(r["state"] == "Succeeded" for r in rows), rows
    # the finished trial did not run again; the interrupted one resumed under its name
    assert sorted(p.name for p in (state / "runs" / "resume-0").iterdir()) == ["attempt-1"]
    assert sorted(p.name for p in (state / "runs" / "resume-1").iterdir()) == [
        "attempt-1", "attempt-2"]
    for r in rows:
        assert r["artifact"]["uri"] == f"s3://{s3.bucket}/adapters/{r['name']}/"
        assert 0 < r["metrics"]["trainableParamPercent"] < 100

    # the adapters are in the S3 bucket; collect --best fetches the lowest eval loss
    best = min(rows, key=lambda r: (r["metrics"]["evalLoss"], r["number"]))
    dest = tmp_path / "best"
    got = subprocess.run(cli(state, "collect", "resume", "--best", "--local", "-o", str(dest)),
                         cwd=REPO, env=env(s3), capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    meta = json.loads((dest / "kubetune.json").read_text())
    assert meta["jobName"] == best["name"]
    assert (dest / "adapter_model.safetensors").is_file()
    # a third run has nothing left to do
    t0 = time.monotonic()
    third = subprocess.run(cli(state, "sweep", str(spec), "--local", "--nproc", "1"),
                           cwd=REPO, env=env(s3), capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and "started" not in third.stdout
    assert time.monotonic() - t0 < 60
