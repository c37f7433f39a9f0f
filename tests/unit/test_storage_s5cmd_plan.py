"""The s5cmd engine's plumbing that needs no server: which prefixes may be copied with a
wildcard, how partial files map back to items, and the sweep of abandoned staging dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.storage import s5cmd


@pytest.mark.parametrize(
    ("prefix", "ok"),
    [
        ("models/llama-8b", True),
        ("models/weird name (v2)", True),
        ("", False),  # the whole bucket: never
        ("models/*", False),  # s5cmd would expand it
        ("models/what?", False),
        ("models/../secrets", False),
        ("models/./x", False),
        ("models//x", False),
        ("models/line\nbreak", False),
    ],
)
def test_only_plain_prefixes_are_copied_with_a_wildcard(prefix: str, ok: bool) -> None:
    assert s5cmd.prefix_eligible(prefix) is ok


def _plan(tmp_path: Path, rels: list[str]) -> s5cmd._Plan:
    items = [s5cmd.Item(f"p/{rel}", 10, None, tmp_path / "out" / rel, rel) for rel in rels]
    settings = s5cmd.Settings(binary="s5cmd", bucket="b", endpoint=None, env={})
    return s5cmd._prefix_plan(items, tmp_path / "stage", settings, s5cmd.WholePrefix("p"))


def test_the_wildcard_plan_excludes_climbing_keys_and_maps_files_back(tmp_path: Path) -> None:
    plan = _plan(tmp_path, ["a.bin", "sub/b.bin", "shard1", "shard12"])
    argv = plan.argv
    assert argv[argv.index("--exclude") + 1] == "*..*"  # always the first exclusion
    assert argv[-2:] == ["s3://b/p/*", f"{tmp_path / 'stage'}/"]
    assert plan.locate("sub/b.bin") == 1
    assert plan.locate("sub/b.bin123456") == 1  # s5cmd's partial file: name + random digits
    assert plan.locate("shard1234") == s5cmd.AMBIGUOUS  # shard1 + 234 or shard12 + 34
    assert plan.locate("other.bin") is None
    # a result counts only at the path the plan gave the item
    good = {"source": "s3://b/p/sub/b.bin", "destination": str(tmp_path / "stage/sub/b.bin")}
    assert plan.index_of(good) == 1
    assert plan.index_of({**good, "destination": str(tmp_path / "elsewhere/b.bin")}) is None
    assert plan.index_of({**good, "source": "s3://b/p/c.bin"}) is None


def test_abandoned_staging_dirs_are_swept_live_ones_kept(tmp_path: Path) -> None:
    old = tmp_path / f"{s5cmd.STAGING_PREFIX}dead"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "i3_").write_bytes(b"x" * 100)
    live = tmp_path / f"{s5cmd.STAGING_PREFIX}live"
    live.mkdir()
    keep = tmp_path / "model.bin"  # not a staging dir, however old
    keep.write_bytes(b"weights")
    past = os.stat(old).st_mtime - s5cmd.ABANDONED_SECONDS - 60
    for p in (old, keep):
        os.utime(p, (past, past))
    assert s5cmd.sweep_abandoned(tmp_path) == 1
    assert not old.exists() and live.is_dir() and keep.read_bytes() == b"weights"
