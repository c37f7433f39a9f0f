"""Condition types, reasons and phases: the vocabulary of `status` (constants, never literals).

`kubectl wait --for=condition=Succeeded ftj/NAME` works because the controller keeps a
condition of type `Succeeded`; reasons are CamelCase words as Kubernetes expects.
"""

from __future__ import annotations

from typing import Final, Literal

# --- phases ----------------------------------------------------------------------------------
Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
PHASE_PENDING: Final = "Pending"
PHASE_RUNNING: Final = "Running"
PHASE_SUCCEEDED: Final = "Succeeded"
PHASE_FAILED: Final = "Failed"
PHASES: Final = (PHASE_PENDING, PHASE_RUNNING, PHASE_SUCCEEDED, PHASE_FAILED)
TERMINAL_PHASES: Final = (PHASE_SUCCEEDED, PHASE_FAILED)

# --- condition types ---------------------------------------------------------------------------
# children (ConfigMap, Service, Job) exist for the current attempt; on a sweep, set only
# while a trial or the report key cannot be created (NameConflict, WaitingForCleanup)
COND_CREATED: Final = "Created"
COND_RUNNING: Final = "Running"  # all pods of the gang are running
COND_SUSPENDED: Final = "Suspended"  # spec.suspend, or waiting in a Kueue queue
COND_SUCCEEDED: Final = "Succeeded"
COND_FAILED: Final = "Failed"
COND_VALID: Final = "Valid"  # spec passed the controller-side checks (secrets, budget, ...)
COND_DISRUPTED: Final = "Disrupted"  # a pod of the named attempt was evicted or preempted

# --- reasons -----------------------------------------------------------------------------------
# spec / environment problems
REASON_INVALID_SPEC: Final = "InvalidSpec"
REASON_SECRET_MISSING: Final = "SecretMissing"
REASON_BUDGET_INFEASIBLE: Final = "BudgetInfeasible"
REASON_VALID: Final = "Valid"
# a foreign object (not controller-owned by this parent) holds a child's name: never adopted
REASON_NAME_CONFLICT: Final = "NameConflict"
# a child of an earlier parent with the same name is still being garbage-collected
REASON_WAITING_FOR_CLEANUP: Final = "WaitingForCleanup"
# the trainer reported an artifact that does not lie under spec.output.uri
REASON_ARTIFACT_OUTSIDE_OUTPUT: Final = "ArtifactOutsideOutput"
# lifecycle
REASON_CREATED: Final = "Created"
REASON_PENDING: Final = "Pending"
REASON_QUEUED: Final = "Queued"
REASON_SUSPENDED: Final = "Suspended"
REASON_RESUMED: Final = "Resumed"
REASON_RUNNING: Final = "Running"
REASON_RESTARTING: Final = "Restarting"
# an earlier attempt's Job deleted because it (or a pod of it) was still running (Event only)
REASON_ATTEMPT_STOPPED: Final = "AttemptStopped"
REASON_SUCCEEDED: Final = "Succeeded"
REASON_COMPLETED: Final = "Completed"
# failures
REASON_POD_FAILED: Final = "PodFailed"
REASON_TRAINER_ERROR: Final = "TrainerError"
REASON_BACKOFF_LIMIT_EXCEEDED: Final = "BackoffLimitExceeded"
REASON_JOB_DELETED: Final = "JobDeleted"
REASON_DEADLINE_EXCEEDED: Final = "DeadlineExceeded"
REASON_PREEMPTED: Final = "Preempted"
REASON_DISRUPTED: Final = "Disrupted"  # restarted after eviction/preemption: no retry used
REASON_OOM_KILLED: Final = "OOMKilled"
# why a pod of the gang does not start (the kubelet's own words, copied as reasons)
POD_START_PROBLEMS: Final = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
)
# sweeps
REASON_SWEEP_RUNNING: Final = "TrialsRunning"
REASON_MAX_TRIALS_REACHED: Final = "MaxTrialsReached"
REASON_MAX_FAILED_TRIALS_EXCEEDED: Final = "MaxFailedTrialsExceeded"
REASON_TRIAL_PRUNED: Final = "TrialPruned"
REASON_TRIAL_FAILED: Final = "TrialFailed"
REASON_STUDY_STORAGE_FULL: Final = "StudyStorageFull"  # a study write found the disk full
REASON_REPORTS_MISSING: Final = "ReportsMissing"  # a trial's intermediate reports never arrived
REASON_STUDY_ERROR: Final = "StudyError"
REASON_SEARCH_SPACE_EXHAUSTED: Final = "SearchSpaceExhausted"

# --- trial states (status.trialList[].state of a FineTuneSweep) -----------------------------
TrialState = Literal["Pending", "Running", "Succeeded", "Failed", "Pruned"]
TRIAL_PENDING: Final = "Pending"
TRIAL_RUNNING: Final = "Running"
TRIAL_SUCCEEDED: Final = "Succeeded"
TRIAL_FAILED: Final = "Failed"
TRIAL_PRUNED: Final = "Pruned"
