"""`python -m orchestrator.controller`: the kubetune controller against the current kubeconfig
(or the in-cluster ServiceAccount).

Threads, all visible here: kopf's event loop (watches of the custom resources, the liveness
probe and the report endpoint), one informer thread per child kind (and namespace), the
reconcile workers, the Lease renewal and the event poster. Only the workers call the API to
change things.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any, cast

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from orchestrator.api.base import GROUP, VERSION
from orchestrator.controller import metrics
from orchestrator.controller.handlers import JOB, SWEEP, Controller
from orchestrator.controller.kube import FTJ_PLURAL, FTS_PLURAL, Kube
from orchestrator.controller.leader import LeaseLock
from orchestrator.controller.settings import ControllerSettings

log = logging.getLogger("kubetune.controller")
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class SetupError(Exception):
    """Something the operator must fix before the controller can start (one line)."""


def _api_client(settings: ControllerSettings) -> tuple[client.ApiClient, str]:
    """The API client and the namespace to default to (the pod's, or the context's)."""
    try:
        config.load_incluster_config()
        namespace = SA_NAMESPACE.read_text().strip() if SA_NAMESPACE.exists() else "default"
    except config.ConfigException:
        try:
            config.load_kube_config()
            _, ctx = config.list_kube_config_contexts()
        except (config.ConfigException, FileNotFoundError, TypeError) as exc:
            raise SetupError(
                f"no Kubernetes credentials: not in a pod and no usable kubeconfig ({exc}); "
                "set KUBECONFIG or run inside the cluster"
            ) from None
        namespace = (ctx.get("context") or {}).get("namespace") or "default"
    cfg = client.Configuration.get_default_copy()
    # one connection per worker and informer, so none waits for a free socket
    cfg.connection_pool_maxsize = max(64, settings.workers + 16)
    return client.ApiClient(cfg), namespace


def build_controller(
    settings: ControllerSettings,
    api: client.ApiClient,
    lock: LeaseLock | None = None,
    namespace: str = "",
) -> Controller:
    # with leader election every write first checks that this replica still leads
    kube = Kube(
        api, qps=settings.api_qps, burst=settings.api_burst, fence=lock.check if lock else None
    )
    from orchestrator.controller.sweeps import SweepReconciler

    return Controller(kube, settings, SweepReconciler(kube, settings, key_namespace=namespace))


def _acquire_lease(
    settings: ControllerSettings, api: client.ApiClient, namespace: str
) -> LeaseLock:
    lock = LeaseLock(
        client.CoordinationV1Api(api),
        settings.lease_name,
        namespace,
        settings.identity,
        lease_duration=settings.lease_duration_seconds,
        renew_deadline=settings.renew_deadline_seconds,
        retry_period=settings.retry_period_seconds,
    )
    try:
        lock.acquire()
        return lock
    except ApiException as exc:
        if exc.status == 404:
            raise SetupError(
                f"namespace {namespace!r} for the leader-election Lease does not exist: create "
                f"it (kubectl create namespace {namespace}), set KUBETUNE_LEASE_NAMESPACE to an "
                "existing one, or set KUBETUNE_LEADER_ELECTION=false"
            ) from None
        if exc.status in (401, 403):
            raise SetupError(
                f"not allowed to use Lease {namespace}/{settings.lease_name} "
                f"(HTTP {exc.status}): grant coordination.k8s.io leases get/create/update "
                "there, or set KUBETUNE_LEADER_ELECTION=false"
            ) from None
        raise


def register(controller: Controller, registry: kopf.OperatorRegistry) -> None:
    """kopf's part: watches of the two custom resources, feeding the caches and the queue.
    Async handlers: they run on kopf's loop and only put and add (no thread, no API call)."""

    @kopf.on.event(GROUP, VERSION, FTJ_PLURAL, registry=registry)  # type: ignore[arg-type]
    async def finetunejob_event(event: dict[str, Any], **_: Any) -> None:
        controller.on_custom(JOB, event.get("type"), event["object"])

    @kopf.on.event(GROUP, VERSION, FTS_PLURAL, registry=registry)  # type: ignore[arg-type]
    async def finetunesweep_event(event: dict[str, Any], **_: Any) -> None:
        controller.on_custom(SWEEP, event.get("type"), event["object"])


def _load_report_key(controller: Controller, namespace: str) -> None:
    """Sweep report tokens derive from a master key in the controller's namespace: read (or
    create) it before anything can ask for a token."""
    name = controller.settings.report_key_secret
    try:
        controller.sweeps.load_master_key()
    except ApiException as exc:
        if exc.status in (401, 403, 404):
            raise SetupError(
                f"cannot read or create Secret {namespace}/{name}, the report master key "
                f"(HTTP {exc.status}): grant secrets get/create in {namespace!r} (the chart's "
                "Role does), or create it: kubectl create secret generic "
                f"{name} -n {namespace} --from-literal=key=$(openssl rand -hex 32)"
            ) from None
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.controller",
        description="kubetune controller: reconciles FineTuneJobs and FineTuneSweeps. Runs "
        "against the in-cluster ServiceAccount, else the current kubeconfig context.",
        epilog="settings (environment variables):\n" + ControllerSettings.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8082/healthz",
        help="liveness endpoint (kopf), '' to disable",
    )
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--log-format", choices=["json", "plain"], default="json")
    args = parser.parse_args(argv)

    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    if not args.verbose:
        # one line per handler run drowns the log and costs CPU at scale
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        settings = ControllerSettings.from_env()
        api, default_ns = _api_client(settings)
        own_ns = settings.lease_namespace or default_ns
        lock: LeaseLock | None = None
        if settings.leader_election:
            lock = _acquire_lease(settings, api, own_ns)
        controller = build_controller(settings, api, lock, own_ns)
        _load_report_key(controller, own_ns)
    except (SetupError, ValueError) as exc:
        print(f"kubetune controller: {exc}", file=sys.stderr)
        return 1  # (2 is argparse's: a usage error)
    except Exception as exc:  # e.g. the API server is unreachable
        print(f"kubetune controller: cannot reach the API server: {exc}", file=sys.stderr)
        return 1

    metrics.serve(settings.metrics_port)
    registry = kopf.OperatorRegistry()
    register(controller, registry)

    @kopf.on.login(registry=registry)
    def login(**kwargs: object) -> kopf.ConnectionInfo | None:
        # same credentials as our own client: in-cluster ServiceAccount or the kubeconfig
        return kopf.login_via_client(**kwargs)  # type: ignore[arg-type]

    runners: list[Any] = []

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: object) -> None:
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        # a timeout on every request kopf sends, as on ours (kube.py, cache.py, leader.py)
        settings.watching.client_timeout = 330
        settings.watching.connect_timeout = 10
        settings.networking.request_timeout = 30
        settings.networking.connect_timeout = 10
        if controller.settings.namespaces:
            # Exact namespace names: nothing to discover. Scanning would list namespaces,
            # which a namespaced install may not (403, retried for ~55 s by kopf's backoffs
            # before it falls back to these names): every start and every fail-over late.
            settings.scanning.disabled = True
        settings.persistence.finalizer = "kubetune.io/controller"
        from orchestrator.controller import report_server

        runners.append(
            await report_server.start(
                controller,
                controller.settings.report_port,
                tls_cert=controller.settings.report_tls_cert,
                tls_key=controller.settings.report_tls_key,
            )
        )

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: object) -> None:
        for runner in runners:
            await runner.cleanup()

    controller.start()
    log.info(
        "kubetune controller starting",
        extra={
            "namespaces": settings.namespaces or "all",
            "image": settings.trainer_image,
            "workers": controller.workers,
        },
    )
    kopf.run(
        registry=registry,
        standalone=True,
        # kopf would derive an identity from getpass.getuser(), which raises for a numeric
        # user without an /etc/passwd entry (the chart's runAsUser 65532): found in a real pod.
        identity=cast(Any, settings.identity),  # kopf's Identity is a NewType of str
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=args.liveness or None,
        loop=asyncio.new_event_loop(),
    )
    controller.stop()
    if lock is not None:
        # workers first: what they still write is fenced once the Lease is released
        controller.wait_stopped(timeout=5.0)
        lock.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
