"""The CLI's contract with users: parsing, one-line errors with exit codes, validation before
anything is sent, the kubectl plugin name, a light `import orchestrator`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.cli.main import main
from tests.support import REPO, free_port

pytestmark = pytest.mark.unit

JOB = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "support-lora"},
    "spec": {
        "model": {"uri": "s3://models/tiny"},
        "data": {"train": "s3://data/train.jsonl", "eval": "s3://data/eval.jsonl"},
        "output": {"uri": "s3://adapters/"},
    },
}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args), prog="kubetune")
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("kubetune: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("submit", "get", "status", "logs", "collect", "artifacts", "cancel", "run",
                    "sweep"):
        assert command in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "version")
    assert code == 0 and out.strip() == "kubetune 0.1.0"


@pytest.mark.parametrize("args", [
    ["get", "--output", "xml"],
    ["frobnicate"],
    ["collect"],
    ["status", "x", "--watch", "--interval", "soon"],
])
def test_usage_errors_are_one_line_with_exit_code_2(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2
    assert "--help" in one_error_line(err)


def test_submit_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "submit", str(tmp_path / "nope.yaml"))
    assert code == 1
    assert one_error_line(err).endswith("nope.yaml: no such file")


def test_submit_dry_run_validates_locally(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(JOB))
    code, out, _ = run(capsys, "submit", str(f), "--dry-run")
    assert code == 0
    assert out.strip() == "finetunejob.kubetune.io/support-lora valid (dry run)"


def test_invalid_spec_names_the_field_in_one_line(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path) -> None:
    bad = json.loads(json.dumps(JOB))
    bad["spec"]["training"] = {"globalBatchSize": 10, "microBatchSize": 4}
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(bad))
    code, _, err = run(capsys, "submit", str(f), "--dry-run")
    assert code == 1
    assert "globalBatchSize" in one_error_line(err)


def test_wrong_kind_in_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text(yaml.safe_dump({**JOB, "kind": "Pod"}))
    code, _, err = run(capsys, "submit", str(f), "--dry-run")
    assert code == 1
    assert "kind must be FineTuneJob or FineTuneSweep" in one_error_line(err)


def test_missing_kubeconfig_is_one_line(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    code, _, err = run(capsys, "get", "--kubeconfig", str(tmp_path / "missing"))
    assert code == 1
    assert "kubeconfig" in one_error_line(err)


def test_unreachable_api_server_fails_fast_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    kc = tmp_path / "kubeconfig"
    kc.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{port}",
                                               "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u",
                                               "namespace": "team-a"}}],
    }))
    t0 = time.monotonic()
    code, _, err = run(capsys, "get", "jobs", "--kubeconfig", str(kc))
    assert code == 1
    assert "cannot reach the Kubernetes API server" in one_error_line(err)
    assert time.monotonic() - t0 < 30


def test_context_namespace_is_the_default(tmp_path: Path) -> None:
    from orchestrator.client import _context_namespace

    kc = tmp_path / "kubeconfig"
    kc.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "a",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "a", "context": {"cluster": "c", "user": "u",
                                               "namespace": "team-a"}},
                     {"name": "b", "context": {"cluster": "c", "user": "u"}}],
    }))
    assert _context_namespace(str(kc), None) == "team-a"
    assert _context_namespace(str(kc), "b") is None


def test_local_flags_need_local(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(JOB))
    code, _, err = run(capsys, "run", str(f), "--nproc", "2")
    assert code == 2
    assert "--local" in one_error_line(err)


def test_local_nproc_must_divide_the_batch(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    job = json.loads(json.dumps(JOB))
    job["spec"]["training"] = {"globalBatchSize": 8, "microBatchSize": 4}
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(job))
    code, _, err = run(capsys, "--state-dir", str(tmp_path / "st"), "run", str(f), "--local",
                       "--nproc", "3")
    assert code == 1
    assert "not divisible" in one_error_line(err)


def test_kubectl_plugin_name() -> None:
    from orchestrator.cli.main import _prog

    assert _prog("/usr/local/bin/kubectl-tune") == "kubectl tune"
    assert _prog("/venv/bin/kubetune") == "kubetune"


def test_import_is_light_and_exports_the_sdk() -> None:
    code = (
        "import sys, orchestrator\n"
        "from orchestrator import Client, FineTuneJob, FineTuneSweep\n"
        "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert 'kubernetes' not in sys.modules\n"
        "print(Client.__name__, FineTuneJob.__name__, FineTuneSweep.__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["Client", "FineTuneJob", "FineTuneSweep"]


def test_console_script_runs_main() -> None:
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "get", "--output", "xml"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("kubetune: error:")
