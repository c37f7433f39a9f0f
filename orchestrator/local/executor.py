"""Runs the trainer on this machine the way a training pod runs it.

The TrainerConfig is rendered by ``orchestrator.render`` exactly as the controller renders
it into the pod's ConfigMap; the command is ``torchrun --standalone --nproc-per-node N -m
orchestrator.trainer --config PATH`` (CPU: one gloo process per rank); the outcome comes
from the same termination message the controller reads from the pod. Every trainer runs
in its own process group, so stopping a run stops torchrun and all of its workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.api import FineTuneJobSpec, TrainerConfig
from orchestrator.api import reasons as R
from orchestrator.api.exit_codes import PERMANENT, PERMANENT_REASONS, ExitCode
from orchestrator.api.trainer_config import REPORT_TOKEN_ENV, SweepTrialRef
from orchestrator.local.state import LocalState
from orchestrator.render import RenderDefaults, render_trainer_config

TERMINATION_ENV = "KUBETUNE_TERMINATION_LOG"
STOP_GRACE_SECONDS = 10.0
_STEP = re.compile(r"step (\d+)/(\d+) \(")
_TOTAL = re.compile(r"training: (\d+) steps \(from step (\d+)\)")
_EVAL = re.compile(r"eval at step (\d+): (.*)$")
_METRIC = re.compile(r"(\w+)=([-+0-9.eE]+|nan|inf)")


class LocalRunError(RuntimeError):
    """A local run cannot start (bad --nproc, missing torchrun, ...)."""


@dataclass
class Outcome:
    """What one attempt ended with, read from the trainer's termination message."""

    status: str  # Succeeded | Failed | Pruned
    exit_code: int | None
    reason: str
    message: str
    metrics: dict[str, Any] = field(default_factory=dict)
    artifact: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == "Succeeded"

    @property
    def pruned(self) -> bool:
        return self.status == "Pruned" or self.exit_code == ExitCode.PRUNED

    @property
    def permanent(self) -> bool:
        """A retry cannot help (bad data, missing model, invalid config, pruned)."""
        if self.pruned:
            return True
        return self.reason in PERMANENT_REASONS or self.exit_code in {int(c) for c in PERMANENT}


@dataclass
class LiveProgress:
    """Progress parsed from the rank-0 log lines (the same lines `kubectl logs` shows)."""

    step: int = 0
    total: int | None = None
    evals: dict[str, float] = field(default_factory=dict)
    eval_step: int | None = None

    def feed(self, line: str) -> bool:
        if m := _STEP.search(line):
            self.step, self.total = int(m.group(1)), int(m.group(2))
            return True
        if m := _TOTAL.search(line):
            self.total, self.step = int(m.group(1)), int(m.group(2))
            return True
        if m := _EVAL.search(line):
            self.eval_step = int(m.group(1))
            self.step = max(self.step, self.eval_step)
            for key, value in _METRIC.findall(m.group(2)):
                self.evals[key] = float(value)
            return True
        return False

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step}
        if self.total is not None:
            out["totalSteps"] = self.total
        return out


def torchrun_argv(nproc: int, config_path: Path) -> list[str]:
    """torchrun next to this interpreter (the venv's), else ``python -m torch.distributed.run``
    (the same program). --standalone picks a free rendezvous port, so trials can run side by
    side without port clashes."""
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nnodes=1", f"--nproc-per-node={nproc}",
            "-m", "orchestrator.trainer", "--config", str(config_path)]


def check_nproc(spec: FineTuneJobSpec, nproc: int) -> None:
    t = spec.training
    if nproc < 1:
        raise LocalRunError(f"--nproc must be at least 1, not {nproc}")
    if t.global_batch_size % (t.micro_batch_size * nproc):
        raise LocalRunError(
            f"training.globalBatchSize {t.global_batch_size} is not divisible by "
            f"microBatchSize {t.micro_batch_size} x {nproc} local processes: choose --nproc "
            "so that it divides, or change the batch sizes"
        )


def default_nproc(spec: FineTuneJobSpec) -> int:
    """Every rank of the gang on this machine: nodes x max(gpusPerNode, 1). Keeping the world
    size keeps gradient accumulation, and so the training result, as on the cluster."""
    return spec.distributed.world_size


def has_cuda_device() -> bool:
    """Without importing torch: NVIDIA device nodes or an explicit CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return visible.strip() not in ("", "-1")
    return Path("/dev/nvidia0").exists()


class TrainerProcess:
    """One attempt of one job: torchrun in its own process group, output to a log file."""

    def __init__(
        self,
        state: LocalState,
        job: str,
        namespace: str,
        spec: FineTuneJobSpec,
        attempt: int,
        *,
        nproc: int,
        sweep: SweepTrialRef | None = None,
        env: Mapping[str, str] | None = None,
        threads: int | None = None,
    ) -> None:
        self.state = state
        self.job = job
        self.attempt = attempt
        self.nproc = nproc
        self.dir = state.run_dir(job, attempt)
        self.log_path = self.dir / "trainer.log"
        self.termination_path = self.dir / "termination.json"
        self.config: TrainerConfig = render_trainer_config(
            {"name": job, "namespace": namespace}, spec, attempt, RenderDefaults(), sweep
        )
        self.extra_env = dict(env or {})
        self.threads = threads
        self.proc: subprocess.Popen[bytes] | None = None
        self.progress = LiveProgress()
        self.started = 0.0
        self._log_pos = 0
        self._partial = ""
        self._outcome: Outcome | None = None

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            TERMINATION_ENV: str(self.termination_path),
            "KUBETUNE_CONFIG": str(self.dir / "config.json"),
            "KUBETUNE_JOB": self.job,
            "KUBETUNE_NAMESPACE": self.config.namespace,
            "KUBETUNE_ATTEMPT": str(self.attempt),
            "KUBETUNE_WORKDIR": str(self.state.work_dir),
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        })
        if self.threads is not None:
            env.setdefault("OMP_NUM_THREADS", str(self.threads))
        if not has_cuda_device():
            env.setdefault("DS_ACCELERATOR", "cpu")  # skip DeepSpeed's accelerator probing
        # the repository root must be importable by the workers (editable or not)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.termination_path.unlink(missing_ok=True)
        config_path = self.dir / "config.json"
        config_path.write_text(self.config.to_json() + "\n")
        (self.dir / "ds_config.json").write_text(
            json.dumps(self.config.deepspeed, indent=2, sort_keys=True) + "\n")
        argv = torchrun_argv(self.nproc, config_path)
        if not Path(argv[0]).is_file() and shutil.which(argv[0]) is None:
            raise LocalRunError(f"cannot run {argv[0]}: install kubetune[trainer]")
        with self.log_path.open("ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.environment(), start_new_session=True,  # own group: Ctrl-C is ours
            )
        self.started = time.time()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def read_log(self) -> list[str]:
        """New complete lines of the log since the last call (also updates progress)."""
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_pos)
                chunk = fh.read()
        except OSError:
            return []
        self._log_pos += len(chunk)
        text = self._partial + chunk.decode("utf-8", errors="replace")
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            self.progress.feed(line)
        return lines

    def poll(self) -> Outcome | None:
        """The outcome once the process has exited, else None."""
        if self._outcome is not None:
            return self._outcome
        if self.proc is None or self.proc.poll() is None:
            self.read_log()
            return None
        self.read_log()
        self._outcome = self._read_outcome(self.proc.returncode)
        return self._outcome

    def wait(self, interval: float = 0.5) -> Outcome:
        while (outcome := self.poll()) is None:
            time.sleep(interval)
        return outcome

    def _read_outcome(self, returncode: int) -> Outcome:
        try:
            doc = json.loads(self.termination_path.read_text())
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, dict) and doc.get("status"):
            return Outcome(
                status=str(doc["status"]),
                exit_code=doc.get("exitCode"),
                reason=str(doc.get("reason") or ""),
                message=str(doc.get("message") or ""),
                metrics={k: v for k, v in (doc.get("metrics") or {}).items()
                         if isinstance(v, int | float) and not isinstance(v, bool)},
                artifact=doc.get("artifact") if isinstance(doc.get("artifact"), dict) else None,
                progress=doc.get("progress") if isinstance(doc.get("progress"), dict) else None,
            )
        # no termination message: the launcher or the interpreter died before the trainer
        # could write one; the log's tail is the best explanation there is
        tail = " ".join(self.tail(5).split())[-400:]
        return Outcome("Failed", returncode, R.REASON_TRAINER_ERROR,
                       f"trainer exited with code {returncode} without a result"
                       + (f": {tail}" if tail else "") + f" (log: {self.log_path})")

    def tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM the whole process group (torchrun forwards it to the workers), SIGKILL
        whatever is left after ``grace`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        _signal_group(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        _signal_group(self.proc.pid, signal.SIGKILL)  # also reaps stray workers
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def report_token_env(token: str | None) -> dict[str, str]:
    return {REPORT_TOKEN_ENV: token} if token else {}
