"""`kubetune status` on an object no controller has touched says where to look: a namespaced
install serves only its own namespaces, and a FineTuneJob elsewhere stays without status."""

from __future__ import annotations

import datetime as dt
import io

import pytest
from rich.console import Console

from orchestrator.cli import format as F

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 12, 3, 12, 0, 0, tzinfo=dt.UTC)


def _job(age_s: int, status: dict | None = None) -> dict:
    created = (NOW - dt.timedelta(seconds=age_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
    obj = {"metadata": {"name": "j", "namespace": "team-b", "creationTimestamp": created},
           "spec": {"model": {"uri": "s3://m"}}}
    if status is not None:
        obj["status"] = status
    return obj


def test_an_unserved_job_names_its_namespace_and_the_setting() -> None:
    hint = F.unserved_hint(_job(95), now=NOW)
    assert hint and "95s" in hint and "namespace team-b" in hint and "watchNamespaces" in hint


def test_no_hint_for_a_new_or_served_object() -> None:
    assert F.unserved_hint(_job(5), now=NOW) is None  # the controller has not had time
    assert F.unserved_hint(_job(600, {"phase": "Pending"}), now=NOW) is None


def test_status_shows_the_hint() -> None:
    out = io.StringIO()
    Console(file=out, width=300).print(F.job_detail(_job(3600)))
    assert "serves namespace team-b" in out.getvalue()
