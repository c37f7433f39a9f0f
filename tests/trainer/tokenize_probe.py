"""The trainer entrypoint with two probes, for tests/trainer/test_token_cache.py: every call
of ``data.tokenize`` appends a line to ``$KT_PROBE_DIR/tokenize-<RANK>.log``, and each rank
writes the sha256 of its training examples to ``$KT_PROBE_DIR/train-<RANK>.sha256``.

    torchrun ... tests/trainer/tokenize_probe.py --config PATH
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator.trainer import data, run
from orchestrator.trainer.__main__ import _exit, main

PROBE = Path(os.environ["KT_PROBE_DIR"])
RANK = os.environ.get("RANK", "0")
real_tokenize = data.tokenize
real_tokenize_data = run.Run.tokenize_data


def tokenize(payloads: Any, fmt: str, *args: Any, **kw: Any) -> Any:
    with open(PROBE / f"tokenize-{RANK}.log", "a") as f:
        f.write(f"{fmt} {len(payloads)}\n")
    return real_tokenize(payloads, fmt, *args, **kw)


def tokenize_data(self: Any, *args: Any, **kw: Any) -> Any:
    out = real_tokenize_data(self, *args, **kw)
    digest = hashlib.sha256(json.dumps(out["train"].examples).encode()).hexdigest()
    (PROBE / f"train-{RANK}.sha256").write_text(digest)
    return out


data.tokenize = tokenize
run.Run.tokenize_data = tokenize_data  # type: ignore[method-assign]

if __name__ == "__main__":
    _exit(main())
