"""Chat tokenization cost against conversation length: the per-prefix loss-mask method
(two renders of the history per assistant turn, quadratic in the turns) against the linear
one (data.chat_spans_linear, a constant number of renders), on one conversation of 2, 8, 32
and 128 turns with a ChatML template and the tests' tokenizer (built here, nothing
downloaded). Both give the same ids and labels (checked here too).

Reports the median seconds per conversation, the speed-up, and the growth factor per 4x
turns: about 4 for linear cost, about 16 for quadratic. Absolute times depend on the
machine; the ratios are the result.

    python bench/chat_tokenize.py [--reps 5] [--out bench/results/chat_tokenize.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TURNS = (2, 8, 32, 128)


def conversation(turns: int) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "You answer questions about colors."}]
    for t in range(turns):
        msgs += [{"role": "user", "content": f"What color is the sky number {t}?"},
                 {"role": "assistant", "content": f"The sky number {t} is blue, as always."}]
    return msgs


def timed(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "bench/results/chat_tokenize.json"))
    a = ap.parse_args()

    from orchestrator.trainer import data
    from tests.trainer import helpers

    tok = helpers.build_tokenizer(Path(tempfile.mkdtemp(prefix="kt-chat-bench-")))
    tok.chat_template = helpers.CHATML_TEMPLATE
    linear_from = data.LINEAR_FROM_TURNS

    def run(msgs: list[dict[str, str]], old: bool) -> dict[str, list[int]]:
        data.LINEAR_FROM_TURNS = 1 << 30 if old else linear_from
        try:
            return data._tokenize_chat(msgs, tok, "bench.jsonl", 1)
        finally:
            data.LINEAR_FROM_TURNS = linear_from

    rows = []
    for turns in TURNS:
        msgs = conversation(turns)
        same = run(msgs, True) == run(msgs, False)
        old = timed(lambda msgs=msgs: run(msgs, True), a.reps)
        new = timed(lambda msgs=msgs: run(msgs, False), a.reps)
        rows.append({"turns": turns, "messages": len(msgs), "oldSeconds": round(old, 6),
                     "newSeconds": round(new, 6), "speedup": round(old / new, 2),
                     "sameIdsAndLabels": same})
    for prev, row in itertools.pairwise(rows):
        row["oldGrowthPer4xTurns"] = round(row["oldSeconds"] / prev["oldSeconds"], 2)
        row["newGrowthPer4xTurns"] = round(row["newSeconds"] / prev["newSeconds"], 2)
    doc = {"benchmark": "chat_tokenize", "template": "chatml", "reps": a.reps,
           "note": "growth per 4x turns: ~4 linear, ~16 quadratic", "results": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    for r in rows:
        print(f"{r['turns']:>4} turns: old {r['oldSeconds'] * 1e3:8.2f} ms  new "
              f"{r['newSeconds'] * 1e3:7.2f} ms  x{r['speedup']:<6} growth old "
              f"{r.get('oldGrowthPer4xTurns', '-')} new {r.get('newGrowthPer4xTurns', '-')}"
              f"  same={r['sameIdsAndLabels']}")


if __name__ == "__main__":
    main()
