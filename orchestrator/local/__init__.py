"""Local mode: the same FineTuneJob and FineTuneSweep specs as processes on this machine.

``kubetune run job.yaml --local`` and ``kubetune sweep sweep.yaml --local`` use these; so can
Python code::

    from orchestrator.api import load_objects
    from orchestrator.local import LocalState, LocalSweepRunner

    [sweep] = load_objects("sweep.yaml")
    LocalSweepRunner(sweep, LocalState(".kubetune")).execute()

Nothing here imports torch: the trainer runs in child processes (torchrun).
"""

from __future__ import annotations

from orchestrator.local.client import LocalClient
from orchestrator.local.executor import LocalRunError, Outcome, TrainerProcess
from orchestrator.local.runner import LocalJobRunner, LocalSweepRunner, Observer
from orchestrator.local.state import LocalState, default_state_dir

__all__ = [
    "LocalClient",
    "LocalJobRunner",
    "LocalRunError",
    "LocalState",
    "LocalSweepRunner",
    "Observer",
    "Outcome",
    "TrainerProcess",
    "default_state_dir",
]
