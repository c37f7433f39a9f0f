"""Label and annotation keys shared by render, the controller and the sweep controller."""

from __future__ import annotations

from typing import Final

LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
APP_NAME: Final = "kubetune"
MANAGED_BY: Final = "kubetune"

LABEL_JOB: Final = "kubetune.io/job"  # FineTuneJob name on every child and pod
LABEL_ATTEMPT: Final = "kubetune.io/attempt"  # attempt number (1-based) on per-attempt children
LABEL_SWEEP: Final = "kubetune.io/sweep"  # FineTuneSweep name, on trial jobs and their children
LABEL_TRIAL: Final = "kubetune.io/trial"  # Optuna trial number, on trial jobs and their children
LABEL_KUEUE_QUEUE: Final = "kueue.x-k8s.io/queue-name"

ANNOTATION_TRIAL_PARAMETERS: Final = "kubetune.io/trial-parameters"  # JSON of the trial's params
ANNOTATION_SPEC_HASH: Final = "kubetune.io/spec-hash"

COMPONENT_TRAINER: Final = "trainer"
COMPONENT_RENDEZVOUS: Final = "rendezvous"
COMPONENT_CONFIG: Final = "config"
COMPONENT_TRIAL: Final = "trial"
