"""Studies deleted with their sweep: the garbage-collection decision (pure) and the
storage side on an in-memory/SQLite storage."""

from __future__ import annotations

import errno
import sqlite3

import optuna
import pytest
import sqlalchemy.exc

from orchestrator.sweep.gc import (
    ATTR_STUDY_NAMESPACE,
    ATTR_STUDY_SWEEP,
    ATTR_STUDY_UID,
    StoredStudy,
    delete_if_uid,
    is_disk_full,
    parse_study,
    sqlite_path,
    stored_studies,
    studies_to_delete,
    sweep_study_name,
    volume_usage,
)

pytestmark = pytest.mark.unit

UID_A = "0a1b2c3d-0000-4000-8000-000000000001"
UID_B = "0a1b2c3d-0000-4000-8000-000000000002"  # same 8-character prefix as A
UID_C = "99999999-0000-4000-8000-000000000003"


def _s(ns: str, sweep: str, uid: str) -> StoredStudy:
    return StoredStudy(sweep_study_name(ns, sweep, uid), ns, sweep, uid)


def test_live_sweeps_keep_their_studies_deleted_ones_go() -> None:
    live, gone = _s("team", "s1", UID_C), _s("team", "s2", UID_A)
    assert studies_to_delete([live, gone], {UID_C}) == [gone.name]


def test_recreated_sweep_same_name_keeps_the_new_study() -> None:
    old = _s("team", "s", UID_A)
    new = _s("team", "s", UID_C)
    assert studies_to_delete([old, new], {UID_C}) == [old.name]


def test_recorded_uid_compared_in_full_not_by_prefix() -> None:
    # B is live, A (same prefix) is gone: A's study goes, with a recorded full uid
    a = _s("team", "a", UID_A)
    assert studies_to_delete([a], {UID_B}) == [a.name]


def test_study_without_record_kept_while_a_live_uid_has_its_prefix() -> None:
    legacy = parse_study("team.s.0a1b2c3d")
    assert legacy == StoredStudy("team.s.0a1b2c3d", "team", "s", "0a1b2c3d")
    assert studies_to_delete([legacy], {UID_A}) == []
    assert studies_to_delete([legacy], {UID_C}) == ["team.s.0a1b2c3d"]


def test_nothing_listed_means_every_study_is_garbage_only_in_scope() -> None:
    st = [_s("team", "s", UID_A), _s("other", "s", UID_C)]
    assert studies_to_delete(st, set(), namespaces=["team"]) == [st[0].name]
    assert studies_to_delete(st, {UID_A, UID_C}) == []


def test_foreign_and_local_studies_are_not_sweep_studies() -> None:
    assert parse_study("default.my-sweep") is None  # kubetune sweep --local
    assert parse_study("my-study") is None
    assert parse_study("team.s.NOTHEX12") is None
    dotted = parse_study("team.a.b.c.deadbeef")
    assert dotted is not None and (dotted.namespace, dotted.sweep) == ("team", "a.b.c")
    attrs = {ATTR_STUDY_UID: UID_A, ATTR_STUDY_NAMESPACE: "team", ATTR_STUDY_SWEEP: "x"}
    assert parse_study("anything", attrs) == StoredStudy("anything", "team", "x", UID_A)


def test_storage_roundtrip_and_uid_guard(tmp_path) -> None:  # type: ignore[no-untyped-def]
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/s.db")
    for uid in (UID_A, UID_C):
        study = optuna.create_study(storage=storage, study_name=sweep_study_name("t", "s", uid))
        study.set_user_attr(ATTR_STUDY_UID, uid)
        study.set_user_attr(ATTR_STUDY_NAMESPACE, "t")
        study.set_user_attr(ATTR_STUDY_SWEEP, "s")
        study.enqueue_trial({})
    optuna.create_study(storage=storage, study_name="t.s")  # a local-mode study
    found = {s.name: s.uid for s in stored_studies(storage)}
    assert found == {"t.s.0a1b2c3d": UID_A, "t.s.99999999": UID_C}
    # a sweep B sharing A's name prefix must not delete A's study
    assert not delete_if_uid(storage, "t.s.0a1b2c3d", UID_B)
    assert delete_if_uid(storage, "t.s.0a1b2c3d", UID_A)
    assert not delete_if_uid(storage, "t.s.0a1b2c3d", UID_A)  # already gone
    names = {s.study_name for s in storage.get_all_studies()}
    assert names == {"t.s.99999999", "t.s"}


def test_disk_full_recognised_through_sqlalchemy() -> None:
    orig = sqlite3.OperationalError("database or disk is full")
    wrapped = sqlalchemy.exc.OperationalError("INSERT ...", {}, orig)
    assert is_disk_full(wrapped)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("write failed") from exc
    except RuntimeError as outer:
        assert is_disk_full(outer)
    try:  # what optuna's RDBStorage raises from a failed commit
        raise optuna.exceptions.StorageInternalError("commit failed") from wrapped
    except optuna.exceptions.StorageInternalError as exc:
        assert is_disk_full(exc)
    assert not is_disk_full(sqlalchemy.exc.OperationalError("x", {}, Exception("locked")))


def test_volume_usage_only_for_sqlite_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert sqlite_path("postgresql://u:p@db/x") is None
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("sqlite:////var/lib/kubetune/optuna.db") == "/var/lib/kubetune/optuna.db"
    usage = volume_usage(f"sqlite:///{tmp_path}/optuna.db")
    assert usage is not None and usage[0] == str(tmp_path) and 0.0 <= usage[1] <= 1.0
    assert volume_usage("postgresql://db/x") is None
