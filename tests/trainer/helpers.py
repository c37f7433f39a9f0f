"""Builders for trainer tests: tiny models from configs, a locally trained tokenizer, small
generated datasets and trainer configs. Nothing here downloads anything."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SPECIALS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# ChatML without a default system prompt (the benches' realistic template)
CHATML_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
NOUNS = ["cat", "dog", "sky", "sea", "leaf", "sun", "rose", "coal", "snow", "lime", "plum",
         "sand"]
COLORS = ["black", "brown", "blue", "green", "green", "yellow", "red", "black", "white", "green",
          "purple", "beige"]
ARCHS = ("llama", "gpt2", "qwen2", "mistral")


def corpus(n: int, seed: int) -> list[dict[str, Any]]:
    """Deterministic records in all three formats about a learnable noun -> color mapping."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(len(NOUNS))
        noun, color = NOUNS[i], COLORS[i]
        out.append({
            "text": f"the {noun} is {color} and the {noun} stays {color}.",
            "prompt": f"What color is the {noun}? Answer:",
            "response": f" {color}",
            "messages": [{"role": "user", "content": f"What color is the {noun}?"},
                         {"role": "assistant", "content": f"The {noun} is {color}."}],
        })
    return out


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build_tokenizer(out: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = []
    for r in corpus(200, 0):
        texts += [r["text"], r["prompt"] + r["response"]]
        texts += [m["content"] for m in r["messages"]]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def model_config(arch: str, vocab: int, hidden: int = 32, layers: int = 2) -> Any:
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4,
                          n_positions=256, **ids)
    common = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
              "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, **ids}
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common)
    raise ValueError(arch)


def build_model(out: Path, arch: str, tokenizer_dir: Path, hidden: int = 32) -> Path:
    """A randomly initialised tiny model (seeded) plus the shared tokenizer, HF layout."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(arch, vocab, hidden))
    model.save_pretrained(str(out))
    return out


def trainer_config(
    path: Path,
    *,
    job: str,
    model_dir: Path | str,
    data_dir: Path,
    output: str,
    method: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    nprocs: int = 1,
    zero_stage: int | None = None,
    sweep: dict[str, Any] | None = None,
    fmt: str = "instruction",
    output_options: dict[str, Any] | None = None,
) -> Path:
    """A TrainerConfig JSON as the controller would render it (DeepSpeed config from
    orchestrator.render when a ZeRO stage is given, else none: plain DDP)."""
    from orchestrator.api import TrainerConfig
    from orchestrator.api.job import FineTuneJobSpec

    model_uri = model_dir if isinstance(model_dir, str) else f"file://{model_dir}"
    spec = {
        "model": {"uri": model_uri},
        "data": {"train": f"file://{data_dir}/train.jsonl", "eval": f"file://{data_dir}/eval.jsonl",
                 "format": fmt, "maxSeqLength": 64, **(data or {})},
        "method": method or {"type": "lora", "rank": 4},
        "training": {"maxSteps": 24, "learningRate": 5e-3, "globalBatchSize": 8,
                     "microBatchSize": 4 // nprocs,
                     "precision": "fp32", "evalEvery": 12, "checkpointEvery": 1000, "seed": 7,
                     "warmupRatio": 0.0, "lrScheduler": "constant", **(training or {})},
        "distributed": {"nodes": 1, "gpusPerNode": 0,
                        "deepspeed": {"zeroStage": zero_stage or 0}},
        "output": {"uri": output, **(output_options or {})},
    }
    parsed = FineTuneJobSpec.model_validate(spec)
    ds: dict[str, Any] = {}
    if zero_stage is not None:
        from orchestrator.render.deepspeed import render_deepspeed_config

        ds = render_deepspeed_config(parsed)
    cfg = TrainerConfig(job_name=job, spec=parsed, deepspeed=ds, sweep=sweep,
                        workdir=str(path.parent / "work"))
    path.write_text(cfg.to_json())
    return path


def trainer_env(tmp: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "KUBETUNE_TERMINATION_LOG": str(tmp / "termination-log"),
        "KUBETUNE_WORKDIR": str(tmp / "work"),
        "KUBETUNE_CACHE_DIR": str(tmp / "cache"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
        "DS_ACCELERATOR": "cpu",
    })
    env.update(extra or {})
    return env


def run_trainer(config: Path, tmp: Path, *, nprocs: int = 1, timeout: float = 600,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real entrypoint: plain python for one process, torchrun (gloo) for more."""
    if nprocs == 1:
        cmd = [sys.executable, "-m", "orchestrator.trainer", "--config", str(config)]
    else:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, f"--nproc-per-node={nprocs}", f"--master-port={_free_port()}",
               "-m", "orchestrator.trainer", "--config", str(config)]
    # Own session, so a timeout kills torchrun *and* its workers (no orphans holding CPUs).
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or trainer_env(tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"trainer timed out after {timeout}s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun workers run in sessions of their
    own, so killing the launcher's process group is not enough)."""
    import contextlib

    import psutil

    try:
        tree = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def termination(tmp: Path) -> dict[str, Any]:
    return json.loads((tmp / "termination-log").read_text())


@contextlib.contextmanager
def report_endpoint(action: str = "continue") -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in for the controller's POST /report on loopback: records every post
    (``auth`` header and JSON ``body``) and answers each with ``action``. Yields the URL and
    the list of posts."""
    seen: list[dict[str, Any]] = []
    answer = json.dumps({"action": action}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"auth": self.headers.get("Authorization"), "body": body})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:  # keep the test output to the trainer's
            return

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/report", seen
    finally:
        server.shutdown()
