"""hf:// datasets: ``data.*: hf://<org>/<name>[@revision][:split]`` read from the Hugging Face
Hub through huggingface_hub (snapshot of the split's Parquet/JSONL files, in HF_HOME).

No hub is reachable here, so the dataset is made locally in the Hub cache layout
(``datasets--org--name/{refs,snapshots}``) and read with HF_HUB_OFFLINE=1, exactly as a pod
with a warm cache volume would. What a user notices: training reads the split and revision
the URI names; a split that does not exist fails at once (exit 65) naming the split and the
ones the dataset has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.api.exit_codes import ExitCode
from orchestrator.trainer import sources
from tests.trainer import helpers

pytestmark = pytest.mark.trainer

MAIN, V1 = "a" * 40, "b" * 40


def _parquet(path: Path, records: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(
        [{k: r[k] for k in ("prompt", "response", "text")} for r in records]), path)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hf://kt/colors: main has 96 train rows (two Parquet shards) and a test split; tag v1
    an older commit with 48 train rows (JSONL)."""
    home = tmp_path_factory.mktemp("hf")
    repo = home / "hub" / "datasets--kt--colors"
    records = helpers.corpus(160, 3)
    main = repo / "snapshots" / MAIN
    _parquet(main / "data" / "train-00000-of-00002.parquet", records[:48])
    _parquet(main / "data" / "train-00001-of-00002.parquet", records[48:96])
    _parquet(main / "data" / "test-00000-of-00001.parquet", records[128:])
    (main / "README.md").write_text("---\nlicense: mit\n---\n")
    helpers.write_jsonl(repo / "snapshots" / V1 / "train.jsonl", records[96:144])
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    return home


def _run(tmp: Path, model_dir: Path, hf_home: Path, train: str, eval_: str) -> Any:
    cfg = helpers.trainer_config(
        tmp / "c.json", job="hf", model_dir=model_dir, data_dir=tmp,
        output=f"file://{tmp}/store", data={"train": train, "eval": eval_},
        training={"maxSteps": 2, "evalEvery": 2}, output_options={"samples": 0})
    env = helpers.trainer_env(tmp, {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    return helpers.run_trainer(cfg, tmp, env=env)


@pytest.mark.parametrize(("train", "rows"), [("hf://kt/colors", 96), ("hf://kt/colors@v1", 48)],
                         ids=["main", "tag-v1"])
def test_training_reads_the_named_revision_and_split(
        tmp_path: Path, tiny_models: dict[str, Path], hf_home: Path, train: str,
        rows: int) -> None:
    proc = _run(tmp_path, tiny_models["llama"], hf_home, train, "hf://kt/colors:test")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"train dataset {train}: {rows} sequences" in proc.stderr
    assert "task dataset hf://kt/colors:test: 32 sequences" in proc.stderr
    assert helpers.termination(tmp_path)["status"] == "Succeeded"


def test_a_missing_split_fails_naming_the_splits(tmp_path: Path, tiny_models: dict[str, Path],
                                                 hf_home: Path) -> None:
    proc = _run(tmp_path, tiny_models["llama"], hf_home, "hf://kt/colors",
                "hf://kt/colors:validation")
    assert proc.returncode == ExitCode.DATA, proc.stderr[-3000:]
    message = helpers.termination(tmp_path)["message"]
    assert "split 'validation'" in message and "test" in message and "train" in message


def test_an_uncached_dataset_offline_says_so(tmp_path: Path, tiny_models: dict[str, Path],
                                             hf_home: Path) -> None:
    proc = _run(tmp_path, tiny_models["llama"], hf_home, "hf://kt/absent",
                "hf://kt/colors:test")
    assert proc.returncode == ExitCode.DATA, proc.stderr[-3000:]
    message = helpers.termination(tmp_path)["message"]
    assert "hf://kt/absent" in message and "HF_HUB_OFFLINE is set" in message


def test_split_files_follow_the_hub_naming_convention() -> None:
    files = ["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
             "data/test-00000-of-00001.parquet", "default/validation/0000.parquet",
             "support_dev.jsonl", "pretraining.jsonl", ".cache/train.jsonl", "dataset_info.txt"]
    assert sources.split_files(files, None) == ["data/train-00000-of-00002.parquet",
                                                "data/train-00001-of-00002.parquet"]
    assert sources.split_files(files, "test") == ["data/test-00000-of-00001.parquet"]
    assert sources.split_files(files, "validation") == ["default/validation/0000.parquet"]
    assert sources.split_files(files, "dev") == ["support_dev.jsonl"]
    assert sources.split_files(["data.jsonl", "more.parquet"], None) == ["data.jsonl",
                                                                         "more.parquet"]
    assert sources.parse_hub_dataset("hf://org/name@v1.0:test") == ("org/name", "v1.0", "test")
    assert sources.parse_hub_dataset("hf://org/name") == ("org/name", None, None)
    with pytest.raises(sources.DataError, match="hf://<org>/<name>"):
        sources.parse_hub_dataset("hf://just-a-name")
