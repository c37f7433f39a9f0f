"""output.tensorboard: the artifact carries TensorBoard event files with the training loss
(and the eval losses) per step; off by default."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from orchestrator import storage
from tests.trainer import helpers

pytestmark = pytest.mark.trainer


def read_scalars(event_file: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of a TFRecord event file: (uint64 length, uint32 crc, data, uint32 crc)*."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    data = event_file.read_bytes()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        ev: Any = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for v in ev.summary.value:
            if v.HasField("simple_value"):
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
def test_event_files_hold_the_train_loss(tmp_path: Path, tiny_models: dict[str, Path],
                                         data_dir: Path, on: bool) -> None:
    cfg = helpers.trainer_config(
        tmp_path / "c.json", job="tb", model_dir=tiny_models["llama"], data_dir=data_dir,
        output=f"file://{tmp_path}/store", output_options={"tensorboard": True} if on else {},
        training={"maxSteps": 8, "evalEvery": 4}, nprocs=2)
    env = helpers.trainer_env(tmp_path, {"KUBETUNE_LOG_EVERY": "2"})
    proc = helpers.run_trainer(cfg, tmp_path, nprocs=2, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    art = tmp_path / "collected"
    storage.download_dir(helpers.termination(tmp_path)["artifact"]["uri"], art)
    events = sorted((art / "tensorboard").glob("events.out.tfevents.*"))
    if not on:
        assert not events and not (art / "tensorboard").exists()
        return
    assert events, sorted(p.name for p in art.rglob("*"))
    scalars: dict[str, list[tuple[int, float]]] = {}
    for f in events:
        for tag, points in read_scalars(f).items():
            scalars.setdefault(tag, []).extend(points)
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6, 8], scalars.keys()
    assert all(v > 0 for _, v in scalars["train/loss"])
    assert {s for s, _ in scalars["eval/task_loss"]} >= {0, 4, 8}
