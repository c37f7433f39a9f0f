"""Studies deleted with their sweep: a sweep deleted while the controller runs loses its
study (the watch); one deleted while no controller ran loses it when the controller starts
(the collection at start); a live sweep's study is never touched."""

from __future__ import annotations

import optuna
import pytest

from tests.cluster.controller_support import ControllerProcess, get
from tests.cluster.sweep_driver import Driver
from tests.cluster.test_finetunesweep import _apply, _done, _sweep
from tests.support import Cluster, wait_for

pytestmark = pytest.mark.cluster


def _storage(controller: ControllerProcess) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{controller.workdir}/optuna.db")


def _trials(controller: ControllerProcess, study: str) -> int | None:
    """Trials of the study in the controller's storage; None when there is no such study."""
    try:
        s = optuna.load_study(study_name=study, storage=_storage(controller))
    except KeyError:
        return None
    return len(s.get_trials(deepcopy=False))


def _run_sweep(cluster: Cluster, namespace: str, controller: ControllerProcess, name: str) -> str:
    """Runs a two-trial sweep to the end; returns its study's name."""
    _apply(cluster, namespace, _sweep(name, maxTrials=2, parallelism=2))
    Driver(cluster, namespace, name, controller.report_url).run_until(
        lambda: _done(cluster, namespace, name), timeout=180
    )
    status = get(cluster, "fts", namespace, name)["status"]
    assert status["phase"] == "Succeeded", status
    study = str(status["studyName"])
    uid = get(cluster, "fts", namespace, name)["metadata"]["uid"]
    assert study == f"{namespace}.{name}.{uid[:8]}"
    assert (_trials(controller, study) or 0) >= 1
    attrs = _storage(controller).get_study_user_attrs(
        _storage(controller).get_study_id_from_name(study)
    )
    assert attrs["kubetune.io/sweep-uid"] == uid
    return study


def _delete(cluster: Cluster, namespace: str, name: str) -> None:
    cluster.kubectl("delete", "fts", name, "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(
        lambda: cluster.kubectl("get", "fts", name, "-n", namespace, check=False).returncode,
        timeout=30,
        what="sweep gone",
    )


def test_a_deleted_sweeps_study_is_deleted_and_a_live_ones_kept(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    keep = _run_sweep(cluster, namespace, controller, "gc-keep")
    doomed = _run_sweep(cluster, namespace, controller, "gc-doomed")
    kept_trials = _trials(controller, keep)

    _delete(cluster, namespace, "gc-doomed")
    wait_for(lambda: _trials(controller, doomed) is None, timeout=30, what="study deleted")
    assert _trials(controller, keep) == kept_trials

    # re-created under the same name: a new study, which the old one's deletion leaves alone
    again = _run_sweep(cluster, namespace, controller, "gc-doomed")
    assert again != doomed
    assert _trials(controller, again) == 2 and _trials(controller, keep) == kept_trials


def test_a_sweep_deleted_while_no_controller_ran_loses_its_study_at_start(
    cluster: Cluster, namespace: str, controller: ControllerProcess
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    keep = _run_sweep(cluster, namespace, controller, "gc-live")
    doomed = _run_sweep(cluster, namespace, controller, "gc-offline")
    kept_trials = _trials(controller, keep)
    controller.stop()
    try:
        _delete(cluster, namespace, "gc-offline")
        assert _trials(controller, doomed) is not None  # nobody deleted it yet
    finally:
        controller.start()
    wait_for(lambda: _trials(controller, doomed) is None, timeout=60, what="study collected")
    assert _trials(controller, keep) == kept_trials
