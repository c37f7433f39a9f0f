#!/usr/bin/env bash
# GPU throughput of the kubetune trainer: a ~1.1B Llama-architecture model built from a config
# (TinyLlama shape, random init, nothing downloaded), LoRA r=16 on all linear layers, bf16,
# one GPU, through the real trainer (orchestrator.trainer.run.Run). Writes JSON with tokens/s
# and MFU and prints a one-line summary.
#
#   bench/gpu_trainer.sh [OUT_JSON]          (env: STEPS=30 SEQ=2048 MICRO=8 PEAK_TFLOPS=989)
#   KT_BENCH_TINY=1 bench/gpu_trainer.sh     (a tiny model on CPU: checks the script, not speed)
#   NO_FAST_PATHS=1 bench/gpu_trainer.sh     (without flash-attention 2 / Liger, to compare)
#
# In an image built with GPU_FAST_PATHS=1 (trainer_image/Dockerfile) the trainer uses
# flash-attention 2 and Liger kernels where they apply (orchestrator/trainer/fastpaths.py);
# "fast_paths" in the JSON and the summary line say which were active.
#
# MFU = achieved FLOP/s / peak. "mfu" is the trainer's own (status.progress, the log;
# orchestrator/trainer/throughput.py): 4·N_frozen + 6·N_trainable + 12·L·d·T, N = the weights of
# the matmul layers (no input embedding), as frozen weights need no weight gradients.
# "mfu_palm_6n" is PaLM's full-training 6·N + 12·L·d·T with the same N, for comparison.
# PEAK_TFLOPS defaults to the H200's dense bf16 peak (989 TFLOP/s).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/gpu_trainer.json}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

if [ -z "${KT_BENCH_TINY:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  mkdir -p "$(dirname "$OUT")"
  echo '{"benchmark": "gpu_trainer", "skipped": "no GPU (nvidia-smi not found)"}' > "$OUT"
  echo "gpu_trainer: skipped, no GPU"
  exit 0
fi

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OUT
export STEPS="${STEPS:-30}" SEQ="${SEQ:-2048}" MICRO="${MICRO:-8}" PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
exec "$PY" - <<'PYEOF'
import json, os, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.trainer import helpers
from trainer_overhead import StepTimer
from orchestrator.api import TrainerConfig
from orchestrator.trainer import fastpaths
from orchestrator.trainer.run import Run

if os.environ.get("NO_FAST_PATHS"):  # the A/B baseline: transformers' default attention
    fastpaths.decide = lambda flags: fastpaths.FastPaths()

tiny = bool(os.environ.get("KT_BENCH_TINY"))
steps, seq, micro = int(os.environ["STEPS"]), int(os.environ["SEQ"]), int(os.environ["MICRO"])
if tiny:
    steps, seq, micro = 6, 64, 2
root = Path(tempfile.mkdtemp(prefix="kt-gpu-bench-"))
tok_dir = root / "tok"
tok = helpers.build_tokenizer(tok_dir)
if tiny:
    cfg = helpers.model_config("llama", len(tok), hidden=64)
else:  # TinyLlama-1.1B shape
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      max_position_embeddings=seq, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, tie_word_embeddings=False)
model_dir = root / "model"
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.save_pretrained(str(model_dir))
n_params = sum(p.numel() for p in model.parameters())
n_matmul = n_params - model.get_input_embeddings().weight.numel()  # N without the lookup table
del model
for f in tok_dir.iterdir():
    (model_dir / f.name).write_bytes(f.read_bytes())
# Fixed-length text records: every sequence is exactly `seq` tokens after truncation.
words = " ".join(f"w{i % 997}" for i in range(seq * 2))
data = root / "data"
helpers.write_jsonl(data / "train.jsonl", [{"text": words}] * (steps * micro + micro))
helpers.write_jsonl(data / "eval.jsonl", [{"text": words}] * micro)
cfg_path = helpers.trainer_config(
    root / "c.json", job="gpu-bench", model_dir=model_dir, data_dir=data,
    output=f"file://{root}/store", fmt="text",
    method={"type": "lora", "rank": 16, "targetModules": "all-linear"},
    data={"maxSeqLength": seq},
    training={"maxSteps": steps, "evalEvery": 10 * steps, "checkpointEvery": 10 * steps,
              "globalBatchSize": micro, "microBatchSize": micro, "learningRate": 1e-4,
              "precision": "fp32" if tiny else "bf16"})
os.environ["KUBETUNE_WORKDIR"] = str(root / "work")
os.environ["KUBETUNE_TERMINATION_LOG"] = str(root / "termination-log")
cfg = TrainerConfig.from_file(cfg_path)
# One process, no DeepSpeed (one GPU needs no sharding). gpusPerNode 0 in the config only
# affects rendering; the trainer uses the GPU whenever torch sees one.
timer = StepTimer()

class Timed(Run):
    def make_trainer(self, *a, **kw):
        t = super().make_trainer(*a, **kw)
        t.add_callback(timer)
        self.progress = next(c for c in t.callback_handler.callbacks
                             if type(c).__name__ == "ProgressCallback")
        return t

t0 = time.time()
run = Timed(cfg)
parts = run.execute()
warm = 3 if len(timer.times) > 6 else 1  # skip warm-up steps (allocator, kernels)
sps = (len(timer.times) - 1 - warm) / (timer.times[-1] - timer.times[warm])
tokens_per_s = sps * micro * seq
L, d = (2, 64) if tiny else (22, 2048)
attn = 12 * L * d * seq
peak = float(os.environ["PEAK_TFLOPS"]) * 1e12
res = {
    "benchmark": "gpu_trainer",
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    "model": "llama-arch 1.1B (TinyLlama shape, random init)" if not tiny else "tiny llama",
    "params": n_params,
    "method": "lora r=16 all-linear",
    "trainable_params": parts["metrics"]["trainableParams"],
    "precision": "bf16" if not tiny else "fp32",
    "seq_len": seq, "micro_batch": micro, "steps": steps,
    "steps_per_s": round(sps, 4),
    "tokens_per_s": round(tokens_per_s, 1),
    # what status.progress shows: 4 N_frozen + 6 N_trainable + attention (trainer/throughput.py)
    "mfu": round(tokens_per_s * run.progress.flops_per_token / peak, 4),
    "flops_per_token": run.progress.flops_per_token,
    # PaLM's full-training accounting, for comparison with published numbers
    "mfu_palm_6n": round(tokens_per_s * (6 * n_matmul + attn) / peak, 4),
    "peak_tflops": peak / 1e12,
    "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if torch.cuda.is_available() else None,
    "wall_s": round(time.time() - t0, 1),
    "fast_paths": run.fast.summary(),  # flash-attention 2 / Liger: which were active
}
out = Path(os.environ["OUT"])
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(res, indent=2) + "\n")
print(f"gpu_trainer: {res['device']} {res['tokens_per_s']} tokens/s, MFU {res['mfu']:.1%} "
      f"(frozen base, as status.progress) / {res['mfu_palm_6n']:.1%} (PaLM 6N); "
      f"fast paths: {run.fast.describe()}; {out}")
PYEOF
