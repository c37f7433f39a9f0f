"""The controller image the chart runs: Dockerfile.controller installs kubetune without the
trainer extra (so no torch), runs as the numeric non-root user the chart's securityContext
expects, and starts `python -m orchestrator.controller`, which takes the chart's args."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.cluster.deploy_helpers import render
from tests.support import REPO, tool

pytestmark = pytest.mark.unit

DOCKERFILE = (REPO / "Dockerfile.controller").read_text()
HEAVY = {"torch", "transformers", "peft", "accelerate", "deepspeed", "triton"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: list[str]) -> set[str]:
    """Distributions `pip install` would pull for these requirements (no extras of ours),
    walked through the metadata of the installed environment (constraints.txt pins both)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        key = (_norm(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            deps = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue  # not installed here, so not how torch would get in either
        # A dependency's own requirements, plus those of the extras it is asked for.
        todo += [(Requirement(d), e) for d in deps for e in ("", *req.extras)]
    return {name for name, _ in seen}


def test_base_install_pulls_no_torch() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pulled = _closure(project["dependencies"])
    assert "kopf" in pulled and "optuna" in pulled
    assert not pulled & HEAVY, f"the controller image would install {sorted(pulled & HEAVY)}"


def test_dockerfile_installs_without_extras_and_runs_non_root() -> None:
    installs = re.findall(r"pip install[^\n]*", DOCKERFILE)
    assert installs and all("[trainer" not in line for line in installs), installs
    assert any(re.search(r"pip install -c constraints\.txt \.(\s|$)", line) for line in installs)
    # The build itself fails if torch slipped in.
    assert '! /opt/kubetune/bin/python -c "import torch"' in DOCKERFILE
    user = re.findall(r"^USER\s+(\S+)", DOCKERFILE, flags=re.M)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    (entrypoint,) = re.findall(r"^ENTRYPOINT\s+(.+)$", DOCKERFILE, flags=re.M)
    assert json.loads(entrypoint) == ["python", "-m", "orchestrator.controller"]


def test_controller_accepts_the_charts_arguments(tmp_path: Path) -> None:
    try:
        tool("helm")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    values = {"extraArgs": ["--verbose"], "health.port": 9090}
    (dep,) = render(values=values, show_only=["templates/deployment.yaml"])
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["--liveness=http://0.0.0.0:9090/healthz", "--verbose"]
    # With no kubeconfig the controller stops right after parsing its arguments;
    # argparse would exit with status 2 and "unrecognized arguments" on a flag it lacks.
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "missing"), "KUBETUNE_LEADER_ELECTION":
           "false", "KUBERNETES_SERVICE_HOST": ""}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.controller", *args], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "unrecognized arguments" not in proc.stderr and proc.returncode != 2, proc.stderr
    # got as far as loading a kubeconfig, and says so in one line
    assert "no Kubernetes credentials" in proc.stderr and "Traceback" not in proc.stderr, (
        proc.stderr
    )
