"""Tokenization once per node (trainer/token_cache.py): what a pod with N ranks spends on
tokenizing a medium synthetic chat set (20,000 conversations of 4 turns, ChatML, packed to
512 tokens, the tests' tokenizer) when every rank tokenizes (before) and when local rank 0
tokenizes and writes the file while the others load it (now).

Measured in this one process: t_tok (build_dataset), t_save and t_load (the .npz); per pod
CPU seconds are then N x t_tok before and t_tok + t_save + (N - 1) x t_load now, and the
ranks' wait is t_tok + t_save + t_load now against t_tok before when the node has a core per
rank (more when ranks share cores, as they did before).

    python bench/tokenize_once.py [--records 20000] [--out bench/results/tokenize_once.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--out", default=str(REPO / "bench/results/tokenize_once.json"))
    a = ap.parse_args()

    from orchestrator.trainer import token_cache
    from orchestrator.trainer.data import build_dataset
    from tests.trainer import helpers

    root = Path(tempfile.mkdtemp(prefix="kt-tok-bench-"))
    tok = helpers.build_tokenizer(root / "tok")
    tok.chat_template = helpers.CHATML_TEMPLATE
    payloads = []
    for i, r in enumerate(helpers.corpus(a.records, 3)):
        m = r["messages"]
        payloads.append([*m, {"role": "user", "content": f"And number {i}?"}, *m[1:], *m, *m])
    where = list(range(1, len(payloads) + 1))
    t0 = time.perf_counter()
    ds = build_dataset(payloads, where, "bench", "chat", tok, 512, True, 7, "train")
    t_tok = time.perf_counter() - t0
    path = root / "train.npz"
    t0 = time.perf_counter()
    token_cache.save(path, ds.examples)
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    loaded = token_cache.load(path)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    token_cache.dataset_key(payloads, where, "chat", tok, 512, True, 7)
    t_key = time.perf_counter() - t0
    assert loaded == ds.examples
    rows = [{"ranksPerNode": n,
             "cpuSecondsBefore": round(n * t_tok, 2),
             "cpuSecondsNow": round(t_tok + t_save + (n - 1) * t_load + n * t_key, 2),
             "waitSecondsBefore": round(t_tok, 2),
             "waitSecondsNow": round(t_tok + t_save + t_load + t_key, 2)} for n in (1, 2, 4, 8)]
    rows[0].update(cpuSecondsNow=rows[0]["cpuSecondsBefore"],
                   waitSecondsNow=rows[0]["waitSecondsBefore"])  # one rank: no file at all
    doc = {"benchmark": "tokenize_once", "records": a.records, "sequences": len(ds),
           "tokens": ds.num_tokens, "fileBytes": path.stat().st_size,
           "tokenizeSeconds": round(t_tok, 3), "saveSeconds": round(t_save, 3),
           "loadSeconds": round(t_load, 3), "keySeconds": round(t_key, 3), "perPod": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
