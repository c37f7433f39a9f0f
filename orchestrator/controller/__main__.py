"""`python -m orchestrator.controller`: the kubetune controller against the current kubeconfig
(or the in-cluster ServiceAccount)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading

import kopf
from kubernetes import client, config

from orchestrator.controller import metrics
from orchestrator.controller.handlers import Controller, register
from orchestrator.controller.kube import Kube
from orchestrator.controller.leader import LeaseLock
from orchestrator.controller.settings import ControllerSettings

log = logging.getLogger("kubetune.controller")


def _api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    cfg = client.Configuration.get_default_copy()
    # enough connections for kopf's worker threads
    cfg.connection_pool_maxsize = 64
    return client.ApiClient(cfg)


def build_controller(settings: ControllerSettings, api: client.ApiClient) -> Controller:
    kube = Kube(api)
    sweeps = None
    try:
        from orchestrator.controller.sweeps import SweepReconciler
    except ImportError:  # pragma: no cover - sweeps are optional while bootstrapping
        SweepReconciler = None  # type: ignore[assignment,misc]
    if SweepReconciler is not None:
        sweeps = SweepReconciler(kube, settings)
    return Controller(kube, settings, sweeps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.controller", description="kubetune controller"
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
    settings = ControllerSettings.from_env()
    api = _api_client()

    if settings.leader_election:
        lock = LeaseLock(
            client.CoordinationV1Api(api),
            settings.lease_name,
            settings.lease_namespace,
            settings.identity,
        )
        lock.acquire()

    metrics.serve(settings.metrics_port)
    controller = build_controller(settings, api)
    if controller.sweeps is not None:
        controller.sweeps.start_report_server(controller)

    registry = kopf.OperatorRegistry()
    register(controller, registry)

    @kopf.on.login(registry=registry)
    def login(**kwargs: object) -> kopf.ConnectionInfo | None:
        # same credentials as our own client: in-cluster ServiceAccount or the kubeconfig
        return kopf.login_via_client(**kwargs)  # type: ignore[arg-type]

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: object) -> None:
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.execution.max_workers = 32
        settings.persistence.finalizer = "kubetune.io/controller"

    threading.Thread(target=controller.resync_forever, name="resync", daemon=True).start()
    log.info(
        "kubetune controller starting",
        extra={"namespaces": settings.namespaces or "all", "image": settings.trainer_image},
    )
    kopf.run(
        registry=registry,
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=args.liveness or None,
        loop=asyncio.new_event_loop(),
    )
    controller.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
