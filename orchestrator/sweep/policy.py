"""The sweep's scheduling rule as a pure function of trial counts and the spec.

Shared by the controller and the local runner so both stop, fail and fan out identically.
Re-read on every reconcile, so editing ``parallelism`` or ``maxTrials`` takes effect at
once.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.api.reasons import (
    REASON_MAX_FAILED_TRIALS_EXCEEDED,
    REASON_MAX_TRIALS_REACHED,
    REASON_SEARCH_SPACE_EXHAUSTED,
    REASON_SWEEP_RUNNING,
    REASON_TRIAL_FAILED,
)
from orchestrator.api.sweep import TrialCounts
from orchestrator.sweep.config import SweepConfig


@dataclass(frozen=True)
class Plan:
    launch: int  # trials to ask (and start) now
    done: bool  # no trial will run any more
    failed: bool  # the sweep as a whole failed
    stop_running: bool  # running trials should be stopped (sweep failed)
    reason: str
    message: str


def plan(counts: TrialCounts, cfg: SweepConfig, *, grid_size: int | None = None) -> Plan:
    if counts.failed > cfg.max_failed_trials:
        return Plan(
            0,
            counts.running == 0,
            True,
            True,
            REASON_MAX_FAILED_TRIALS_EXCEEDED,
            f"{counts.failed} trials failed (maxFailedTrials is {cfg.max_failed_trials})",
        )
    budget = cfg.max_trials if grid_size is None else min(cfg.max_trials, grid_size)
    launch = max(0, min(cfg.parallelism - counts.running, budget - counts.created))
    finished = counts.created - counts.running
    if counts.created >= budget and counts.running == 0:
        if counts.succeeded == 0:
            return Plan(
                0,
                True,
                True,
                False,
                REASON_TRIAL_FAILED,
                f"all {counts.created} trials finished and none succeeded",
            )
        exhausted = grid_size is not None and grid_size < cfg.max_trials
        return Plan(
            0,
            True,
            False,
            False,
            REASON_SEARCH_SPACE_EXHAUSTED if exhausted else REASON_MAX_TRIALS_REACHED,
            f"{finished} trials finished ({counts.succeeded} succeeded, {counts.failed} "
            f"failed, {counts.pruned} pruned)" + _notes(counts, cfg),
        )
    return Plan(
        launch,
        False,
        False,
        False,
        REASON_SWEEP_RUNNING,
        f"{counts.running} running, {finished}/{cfg.max_trials} finished",
    )


def _notes(counts: TrialCounts, cfg: SweepConfig) -> str:
    notes = []
    if counts.reused:
        notes.append(f"{counts.reused} reused an identical trial's result")
    if cfg.constraints and counts.infeasible:
        notes.append(f"{counts.infeasible} infeasible")
        if counts.infeasible >= counts.succeeded:
            notes.append("no trial met spec.constraints, so there is no best trial")
    return "; " + "; ".join(notes) if notes else ""
