"""The controller's part of study garbage collection: a sweep deleted by the watch loses
its study in the key's next reconcile; the collection at start deletes the studies of
sweeps that are gone and never a live one's; a failed listing deletes nothing; a full disk
becomes an Event on the sweep."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy.exc

from orchestrator.controller.handlers import SWEEP, Controller
from orchestrator.controller.settings import ControllerSettings
from orchestrator.controller.sweeps import SweepReconciler
from orchestrator.sweep import get_storage
from orchestrator.sweep.gc import (
    ATTR_STUDY_NAMESPACE,
    ATTR_STUDY_SWEEP,
    ATTR_STUDY_UID,
    sweep_study_name,
)

pytestmark = pytest.mark.unit

LIVE = "11111111-aaaa-4000-8000-000000000001"
GONE = "22222222-bbbb-4000-8000-000000000002"
NEW = "33333333-cccc-4000-8000-000000000003"


class FakeKube:
    def __init__(self) -> None:
        self.sweeps: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.list_fails = False

    def list_custom(self, plural: str, namespace: str | None = None, **_: Any) -> list[dict]:
        if self.list_fails:
            raise RuntimeError("API server unreachable")
        return [s for s in self.sweeps if namespace in (None, s["metadata"]["namespace"])]

    def event(self, obj: dict, type_: str, reason: str, message: str) -> None:
        self.events.append(f"{reason}: {message}")


def _sweep(name: str, uid: str, ns: str = "team") -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneSweep",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": "1"},
        "spec": {},
    }


def _study(url: str, ns: str, name: str, uid: str) -> str:
    study = optuna.create_study(
        storage=get_storage(url), study_name=sweep_study_name(ns, name, uid)
    )
    for k, v in ((ATTR_STUDY_UID, uid), (ATTR_STUDY_NAMESPACE, ns), (ATTR_STUDY_SWEEP, name)):
        study.set_user_attr(k, v)
    study.enqueue_trial({})  # a trial, so that deleting the study deletes rows
    return study.study_name


def _names(url: str) -> set[str]:
    return {s.study_name for s in get_storage(url).get_all_studies()}


def _setup(tmp_path: Path, **kw: Any) -> tuple[Controller, FakeKube, str]:
    url = f"sqlite:///{tmp_path}/optuna.db"
    kube = FakeKube()
    settings = ControllerSettings(leader_election=False, study_storage=url, **kw)
    return Controller(kube, settings, SweepReconciler(kube, settings)), kube, url  # type: ignore[arg-type]


def _drain(ctl: Controller) -> None:
    while (key := ctl.queue.get(timeout=0)) is not None:
        ctl.process(key)  # type: ignore[arg-type]
        ctl.queue.done(key)


def test_a_sweep_deleted_by_the_watch_loses_its_study_not_the_recreated_one(
    tmp_path: Path,
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ctl, _kube, url = _setup(tmp_path)
    old = _study(url, "team", "s", GONE)
    other = _study(url, "team", "other", LIVE)
    ctl.on_custom(SWEEP, "DELETED", _sweep("s", GONE))
    # re-created under the same name before the worker got to the key
    new = _study(url, "team", "s", NEW)
    ctl.ftss.put(_sweep("s", NEW))
    ctl.sweeps.reconcile = lambda obj, children: None  # type: ignore[method-assign]
    _drain(ctl)
    assert _names(url) == {other, new}
    assert old not in _names(url)


def test_collection_at_start_deletes_only_studies_of_sweeps_that_are_gone(
    tmp_path: Path,
) -> None:
    ctl, kube, url = _setup(tmp_path)
    kube.sweeps = [_sweep("live", LIVE)]
    live = _study(url, "team", "live", LIVE)
    gone = _study(url, "team", "gone", GONE)
    optuna.create_study(storage=get_storage(url), study_name="team.local-sweep")  # not ours
    assert ctl.collect_studies() == [gone]
    assert _names(url) == {live, "team.local-sweep"}
    assert ctl.collect_studies() == []


def test_a_failed_listing_deletes_nothing(tmp_path: Path) -> None:
    ctl, kube, url = _setup(tmp_path)
    kube.list_fails = True
    live = _study(url, "team", "live", LIVE)
    assert ctl.collect_studies() is None
    assert _names(url) == {live}


def test_a_sweep_only_in_the_watch_cache_is_live(tmp_path: Path) -> None:
    ctl, _kube, url = _setup(tmp_path)
    live = _study(url, "team", "new", NEW)
    ctl.ftss.put(_sweep("new", NEW))  # created after the LIST
    assert ctl.collect_studies() == []
    assert _names(url) == {live}


def test_namespaced_controller_leaves_other_namespaces_studies(tmp_path: Path) -> None:
    ctl, _kube, url = _setup(tmp_path, namespaces=["team"])
    theirs = _study(url, "elsewhere", "s", GONE)
    ours = _study(url, "team", "s", GONE)
    assert ctl.collect_studies() == [ours]
    assert _names(url) == {theirs}


def test_a_full_disk_is_an_event_naming_the_chart_value(tmp_path: Path) -> None:
    ctl, kube, _url = _setup(tmp_path)
    full = sqlalchemy.exc.OperationalError("INSERT", {}, sqlite3.OperationalError(
        "database or disk is full"))

    def decide(*_: Any) -> Any:
        raise full

    ctl.sweeps._decide = decide  # type: ignore[method-assign]
    for _ in range(3):
        with pytest.raises(sqlalchemy.exc.OperationalError):
            ctl.sweeps.reconcile(_sweep("s", LIVE), [])
    assert len(kube.events) == 1  # rate-limited
    assert kube.events[0].startswith("StudyStorageFull")
    assert "studyStorage.persistence.size" in kube.events[0] and str(tmp_path) in kube.events[0]


def test_a_nearly_full_study_volume_is_a_gauge_and_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    from orchestrator.controller import metrics

    ctl, _kube, _url = _setup(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 85, 15))  # type: ignore[attr-defined]
    with caplog.at_level("WARNING", logger="kubetune.sweeps"):
        assert ctl.sweeps.check_volume() == pytest.approx(0.85)
        ctl.sweeps.check_volume()
    assert metrics.STUDY_VOLUME_USED._value.get() == pytest.approx(0.85)
    warnings = [r.getMessage() for r in caplog.records if "85% full" in r.getMessage()]
    assert len(warnings) == 1 and "studyStorage.persistence.size" in warnings[0]
    assert str(tmp_path) in warnings[0]
