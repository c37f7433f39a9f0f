"""Every example in examples/ is a valid kubetune object, and the set covers the use cases
the docs promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.api import FineTuneJob, FineTuneSweep, load_objects
from orchestrator.api.crdgen import MAX_JOB_NAME, MAX_SWEEP_NAME

pytestmark = pytest.mark.unit

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_valid(path: Path) -> None:
    objs = load_objects(path)
    assert objs, f"{path.name} holds no object"
    for obj in objs:
        limit = MAX_JOB_NAME if isinstance(obj, FineTuneJob) else MAX_SWEEP_NAME
        assert 0 < len(obj.name) <= limit


def _jobs() -> dict[str, FineTuneJob]:
    return {p.stem: o for p in EXAMPLES for o in load_objects(p) if isinstance(o, FineTuneJob)}


def test_examples_cover_the_documented_setups() -> None:
    jobs = _jobs()
    single = jobs["lora-llama-8gpu"].spec
    assert (single.method.type, single.distributed.nodes, single.distributed.gpus_per_node) == (
        "lora",
        1,
        8,
    )
    zero3 = jobs["zero3-2node"].spec
    assert zero3.distributed.nodes == 2 and zero3.distributed.deepspeed.zero_stage == 3
    assert jobs["qlora-single-gpu"].spec.method.type == "qlora"
    assert jobs["prefix-tuning"].spec.method.type == "prefix"
    sweeps = [o for p in EXAMPLES for o in load_objects(p) if isinstance(o, FineTuneSweep)]
    assert any(len(s.spec.objectives) == 2 for s in sweeps)
    assert any(s.spec.early_stopping.pruner != "none" for s in sweeps)


def test_examples_fit_the_fake_gpu_nodes() -> None:
    # tools/cluster/nodes.sh: 8 GPUs, 94 CPUs, 980Gi allocatable per node
    for name, job in _jobs().items():
        res = job.spec.resources
        assert job.spec.distributed.gpus_per_node <= 8, name
        assert res.cpu is None or int(res.cpu) <= 94, name
        assert res.memory is None or int(res.memory.removesuffix("Gi")) <= 980, name
