"""``python -m orchestrator.trainer --config PATH`` (run it under torchrun).

Exit codes: see ``orchestrator.trainer.errors.ExitCode`` and docs/trainer.md.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import signal
import sys
import traceback

from orchestrator.trainer.errors import (
    ConfigError,
    ExitCode,
    Pruned,
    TrainerError,
    configure,
    disk_fault_in,
    storage_failure,
)

CONFIG_ENV = "KUBETUNE_CONFIG"
log = logging.getLogger("orchestrator.trainer")


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "botocore", "boto3", "s3transfer", "DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _prepare_env(cfg: object) -> None:
    """Process-wide settings that must precede the heavy imports."""
    spec = cfg.spec  # type: ignore[attr-defined]
    # Failure messages name the credentials Secret and the workspace volume.
    configure(spec.storage.credentials_secret,
              os.environ.get("KUBETUNE_WORKDIR") or cfg.workdir)  # type: ignore[attr-defined]
    os.environ.setdefault("KUBETUNE_PVC_ROOT", cfg.pvc_mount_root)  # type: ignore[attr-defined]
    if spec.storage.endpoint:
        os.environ.setdefault("KUBETUNE_S3_ENDPOINT", spec.storage.endpoint)
    if spec.storage.region:
        os.environ.setdefault("KUBETUNE_S3_REGION", spec.storage.region)
    if not spec.model.uri.startswith("hf://"):
        # Nothing may reach for a hub when the model is ours.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_config(path: str) -> object:
    from pydantic import ValidationError

    from orchestrator.api import TrainerConfig

    try:
        return TrainerConfig.from_file(path)
    except FileNotFoundError:
        raise ConfigError(f"trainer config {path} not found") from None
    except ValidationError as exc:
        from orchestrator.api.paths import format_errors

        raise ConfigError(f"invalid trainer config {path}: {format_errors(exc)}") from None
    except ValueError as exc:
        raise ConfigError(f"invalid trainer config {path}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    _end_tracking(code)
    return code


def _end_tracking(code: int) -> None:
    """End the MLflow / W&B runs with the outcome, and wait until their data is written:
    :func:`_exit` skips the trackers' atexit hooks. Only if the run got as far as importing
    the tracking module (it is what opens runs)."""
    tracking = sys.modules.get("orchestrator.trainer.tracking")
    if tracking is not None:
        try:
            tracking.finish(code)
        except Exception as exc:  # the outcome is decided; tracking must not change it
            log.warning("ending the experiment tracking runs failed: %s", exc)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.trainer",
                                     description="kubetune trainer (run under torchrun)")
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV),
                        help=f"TrainerConfig JSON (default: ${CONFIG_ENV})")
    parser.add_argument("--plan-only", action="store_true",
                        help="print the parameter-budget plan as JSON and exit")
    args = parser.parse_args(argv)
    _setup_logging()
    # `kill -USR1 <pid>` prints every thread's stack to stderr: the tool for a hung collective.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    from orchestrator.trainer import graceful

    graceful.install()

    from orchestrator.trainer import artifact

    try:
        if not args.config:
            raise ConfigError(f"no trainer config: pass --config PATH or set ${CONFIG_ENV}")
        cfg = load_config(args.config)
        _prepare_env(cfg)
        if args.plan_only:
            print(json.dumps(plan_only(cfg), indent=2))
            return 0
        from orchestrator.trainer.run import Run

        parts = Run(cfg).execute()
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            artifact.write_termination(ExitCode.OK, parts.pop("message", "") or "", **parts)
        log.info("done: %s", json.dumps(parts.get("metrics"), default=str))
        _leave_process_group()
        return int(ExitCode.OK)
    except TrainerError as exc:
        return _fail(exc)
    except Exception as exc:
        if (known := _storage_error(exc)) is not None:
            log.debug("%s", traceback.format_exc())
            return _fail(known)
        log.error("unexpected error: %s\n%s", exc, traceback.format_exc())
        artifact.write_termination(ExitCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        return int(ExitCode.INTERNAL)


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter does: left to interpreter exit,
    its communication threads can abort the process ("terminate called without an active
    exception", seen in a real pod after a successful run) and torchrun then reports the
    pod as failed. Every rank gets here together, so nothing is pending."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # the run succeeded; a teardown hiccup must not change that
        log.debug("process group teardown: %s", exc)


def _fail(exc: TrainerError) -> int:
    from orchestrator.trainer import artifact

    code = exc.exit_code
    (log.warning if isinstance(exc, Pruned) else log.error)("%s: %s", exc.reason, exc)
    artifact.write_termination(code, str(exc), reason=exc.reason, **getattr(exc, "parts", {}))
    return int(code)


def _storage_error(exc: Exception) -> TrainerError | None:
    """A storage failure no phase translated (e.g. downloading a checkpoint to resume from),
    or a full / failing local disk anywhere (a checkpoint save wraps ENOSPC in its own
    error): the exit code and reason its fault calls for (errors.storage_failure)."""
    from orchestrator import storage

    if isinstance(exc, storage.StorageError):
        return storage_failure(exc, "object storage failed", "spec.output.uri")
    if disk_fault_in(exc) is not None:
        return storage_failure(exc, "writing to the local disk failed", "")
    return None


def plan_only(cfg: object) -> dict[str, object]:
    from orchestrator.trainer import arch, sources
    from orchestrator.trainer.run import plan_for

    spec = cfg.spec  # type: ignore[attr-defined]
    model_dir = sources.resolve_model(spec.model.uri)
    plan = plan_for(arch.shape_from_dir(model_dir), spec.method)
    return {**plan.summary(), "modules": list(plan.modules)}


def _exit(code: int) -> None:
    """Leave without interpreter teardown. By now the termination message, the artifact and
    the logs are out; what teardown still runs is static destructors of torch/gloo threads,
    and one of them occasionally aborts the process after a clean run ("terminate called
    without an active exception", exit -6: seen on the real node and in CI even after the
    process group was destroyed), which torchrun reports as a failed rank. ``os._exit``
    keeps the exit code the run decided on."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
