"""Tokenization once per node (token_cache.py): under torchrun only local rank 0 calls the
tokenizer, the other rank trains on the very same examples loaded from its file, a second
run in the same workspace tokenizes nothing, and a tokenization error on local rank 0 stops
the waiting rank at once with the same exit code. The file format round-trips exactly."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.trainer import token_cache
from orchestrator.trainer.data import IGNORE, TokenDataset
from tests.trainer import helpers

pytestmark = pytest.mark.trainer
PROBE = Path(__file__).with_name("tokenize_probe.py")


def _run(cfg: Path, tmp: Path, probe: Path, timeout: float = 600) -> Any:
    import subprocess

    probe.mkdir(parents=True, exist_ok=True)
    env = helpers.trainer_env(tmp, {"KT_PROBE_DIR": str(probe)})
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc-per-node=2", f"--master-port={helpers._free_port()}", str(PROBE),
           "--config", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        helpers.kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"trainer timed out:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    plain = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
             {"input_ids": [300000, 2], "labels": [300000, 2]}]
    packed = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE, 6, IGNORE, 8],
               "position_ids": [0, 1, 0, 1]}]
    odd = [{"input_ids": [1, 2], "labels": [1, 9]}]  # a label that is not its token
    for i, examples in enumerate((plain, packed, odd)):
        path = tmp_path / f"{i}.npz"
        token_cache.save(path, examples)
        assert token_cache.load(path) == examples
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.npz", "1.npz", "2.npz"]  # no tmp


def test_one_process_builds_and_writes_nothing(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    ds = TokenDataset([{"input_ids": [1, 2], "labels": [1, 2]}], "train")
    got = token_cache.build_on_node(
        [token_cache.Job("train", lambda: pytest.fail("no key needed"), lambda: ds)],
        tmp_path / "tok")
    assert got == {"train": ds} and not (tmp_path / "tok").exists()


def test_the_key_follows_every_input(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    base: dict[str, Any] = {"payloads": ["a b", "c"], "where": [1, 2], "fmt": "text",
                            "tokenizer": tok, "max_len": 64, "packing": False, "seed": 7}
    key = token_cache.dataset_key(**base)
    assert token_cache.dataset_key(**base) == key
    changes = {"payloads": ["a b", "d"], "where": [1, 3], "fmt": "instruction",
               "max_len": 32, "packing": True, "seed": 8}
    for field, value in changes.items():
        assert token_cache.dataset_key(**{**base, field: value}) != key, field
    other = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    other.chat_template = "{{ messages }}"
    assert token_cache.dataset_key(**{**base, "tokenizer": other}) != key


def test_two_ranks_tokenize_once_and_a_rerun_reuses_it(
        tmp_path: Path, tiny_models: dict[str, Path], data_dir: Path) -> None:
    def config(store: str) -> Path:
        return helpers.trainer_config(
            tmp_path / "c.json", job="tok-once", model_dir=tiny_models["llama"],
            data_dir=data_dir, output=f"file://{tmp_path}/{store}", fmt="chat", nprocs=2,
            data={"packing": True}, training={"maxSteps": 2, "evalEvery": 2},
            output_options={"samples": 0})

    first = tmp_path / "probe1"
    proc = _run(config("store1"), tmp_path, first)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in first.glob("tokenize-*")) == ["tokenize-0.log"]
    assert (first / "tokenize-0.log").read_text().split("\n")[:2] == ["chat 128", "chat 32"]
    digests = {(first / f"train-{r}.sha256").read_text() for r in (0, 1)}
    assert len(digests) == 1  # both ranks hold the same (packed) training examples
    assert "train: tokenized on local rank 0" in proc.stderr
    cached = list((tmp_path / "work" / "tok-once" / "cache" / "tokenized").iterdir())
    assert len(cached) == 2 and all(p.suffix == ".npz" for p in cached)

    second = tmp_path / "probe2"  # same workspace, inputs and job; another artifact place
    proc = _run(config("store2"), tmp_path, second)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not list(second.glob("tokenize-*"))
    assert "train: reusing tokenized data" in proc.stderr
    assert {(second / f"train-{r}.sha256").read_text() for r in (0, 1)} == digests


def test_a_tokenization_error_stops_the_waiting_rank_too(
        tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    data = tmp_path / "data"
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    helpers.write_jsonl(data / "train.jsonl", [bad] * 8)
    helpers.write_jsonl(data / "eval.jsonl", [bad] * 2)
    cfg = helpers.trainer_config(
        tmp_path / "c.json", job="tok-bad", model_dir=tiny_models["llama"], data_dir=data,
        output=f"file://{tmp_path}/store", fmt="chat", nprocs=2,
        data={"chatTemplate": "{{ raise_exception('no chats here') }}"})
    proc = _run(cfg, tmp_path, tmp_path / "probe")
    assert proc.returncode != 0
    msg = helpers.termination(tmp_path)
    assert msg["exitCode"] == 65 and "no chats here" in msg["message"], msg
    # rank 1 stopped on local rank 0's note, or on torchrun's SIGTERM: not after the 30 s
    # torchrun waits before SIGKILL
    assert "rank1 ERROR" in proc.stderr, proc.stderr[-3000:]
    assert "forcefully exiting via 9" not in proc.stderr
    assert os.path.exists(tmp_path / "probe" / "tokenize-0.log")
    assert not os.path.exists(tmp_path / "probe" / "tokenize-1.log")
