"""Prometheus metrics served by the controller."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "kubetune_reconciles_total", "Reconciliations by kind and outcome", ["kind", "outcome"]
)
RECONCILE_SECONDS = Histogram(
    "kubetune_reconcile_duration_seconds",
    "Reconcile latency by kind",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JOBS_BY_PHASE = Gauge("kubetune_finetunejobs", "FineTuneJobs by phase", ["phase"])
SWEEP_TRIALS = Gauge(
    "kubetune_sweep_trials", "Trials of each sweep by state", ["namespace", "sweep", "state"]
)
INTERMEDIATE_REPORTS = Counter(
    "kubetune_intermediate_reports_total",
    "Intermediate metric reports from trial pods",
    ["outcome"],
)

API_REQUESTS = Counter(
    "kubetune_api_requests_total", "Requests the controller sent to the API server", ["verb"]
)
EVENTS_PENDING = Gauge(
    "kubetune_events_pending",
    "Events waiting to be posted (they go out at their own rate limit, after the changes)",
)
STUDIES_DELETED = Counter(
    "kubetune_studies_deleted_total",
    "Studies deleted from the study storage: with their sweep (deleted) or by the periodic "
    "collection of studies whose sweep no longer exists (collected)",
    ["how"],
)
STUDY_VOLUME_USED = Gauge(
    "kubetune_study_volume_used_ratio",
    "Used fraction of the filesystem holding the SQLite study database (0-1)",
)


def serve(port: int) -> None:
    start_http_server(port)
