"""Tokenize once per node: each pod's local rank 0 tokenizes (and truncates and packs) the
data sets and writes them to the pod's workspace; the pod's other ranks load that file
instead of tokenizing everything again themselves.

Files are content-addressed: the name carries a sha256 of everything the examples depend on
(the validated records and their line numbers, the format, the tokenizer's vocabulary,
normaliser, special tokens and chat template, maxSeqLength, packing, the seed, library
versions and ``FORMAT``), so a file that exists is always the right one and may be reused
by a later run in the same workspace (a restarted container keeps its emptyDir). A file
appears only by an atomic rename of a complete temporary one, so no rank ever reads a
half-written file, also when several pods share a workspace volume and write the same file.

Waiting ranks poll for the files instead of entering a collective: tokenizing a large set
on one rank may take longer than the process group's timeout. When local rank 0 fails it
leaves a ``.failed`` note, and the others stop with the same kind of error at once (local
rank 0 writes the pod's termination message); SIGTERM (torchrun stopping the pod's ranks
after another failed) ends the wait too. One short barrier first lets local rank 0
clear notes an earlier attempt in the same workspace left.

Storage: numpy ``.npz`` (no ``datasets``): the token ids of all examples in one int32
array with their offsets, the labels as a one-byte mask (a label is always either its token
or -100), packed position ids as int32: about 5 bytes per token (9 packed).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.trainer import errors, graceful
from orchestrator.trainer.data import IGNORE, Example, TokenDataset
from orchestrator.trainer.dist import barrier, local_rank

log = logging.getLogger("orchestrator.trainer")

#: Bump when tokenization, truncation or packing (data.py) changes what they produce.
FORMAT = 1
POLL_SECONDS = 0.2


@dataclass
class Job:
    name: str  # the data set ("train", "task", ...)
    key: Callable[[], str]  # its content hash (dataset_key), computed only when cached
    build: Callable[[], TokenDataset]  # tokenize, truncate, pack


_fingerprints: dict[int, tuple[Any, str]] = {}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the tokenizer's output (not where it was loaded from)."""
    if (hit := _fingerprints.get(id(tokenizer))) is not None and hit[0] is tokenizer:
        return hit[1]
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizers: vocab, merges, normaliser, post-processor
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: getattr(tokenizer, k, None) for k in (
            "bos_token_id", "eos_token_id", "pad_token_id", "add_bos_token", "add_eos_token")},
    }, sort_keys=True, default=str).encode())
    _fingerprints[id(tokenizer)] = (tokenizer, h.hexdigest())
    return h.hexdigest()


def dataset_key(payloads: Sequence[Any], where: Sequence[int], fmt: str, tokenizer: Any,
                max_len: int, packing: bool, seed: int) -> str:
    import tokenizers
    import transformers

    h = hashlib.sha256(json.dumps({
        "format_version": FORMAT, "format": fmt, "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_len": max_len, "packing": packing, "seed": seed,
        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
        "records": len(payloads)}, sort_keys=True).encode())
    for p, w in zip(payloads, where, strict=True):
        h.update(json.dumps([w, p], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_path(root: Path, job: Job) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in job.name)
    return root / f"{safe}-{job.key()[:40]}.npz"


def _failed(path: Path) -> Path:
    return path.with_name(path.name + ".failed")


def save(path: Path, examples: list[Example]) -> None:
    """Write atomically: a temporary file in the same directory, then rename."""
    import numpy as np

    ids = [t for ex in examples for t in ex["input_ids"]]
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum([len(ex["input_ids"]) for ex in examples], out=offsets[1:])
    arrays: dict[str, Any] = {"input_ids": np.asarray(ids, dtype=np.int32), "offsets": offsets}
    labels = [lab for ex in examples for lab in ex["labels"]]
    if all(lab in (IGNORE, t) for lab, t in zip(labels, ids, strict=True)):
        arrays["trained"] = np.asarray([lab != IGNORE for lab in labels], dtype=np.uint8)
    else:  # never today; kept exact should a format ever train on other labels
        arrays["labels"] = np.asarray(labels, dtype=np.int32)
    if examples and "position_ids" in examples[0]:
        arrays["position_ids"] = np.asarray(
            [p for ex in examples for p in ex["position_ids"]], dtype=np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path) -> list[Example]:
    import numpy as np

    with np.load(path) as z:
        offsets = z["offsets"].tolist()
        ids = z["input_ids"].tolist()
        if "trained" in z:
            labels = [t if m else IGNORE for t, m in zip(ids, z["trained"].tolist(),
                                                         strict=True)]
        else:
            labels = z["labels"].tolist()
        pos = z["position_ids"].tolist() if "position_ids" in z else None
    out: list[Example] = []
    for a, b in itertools.pairwise(offsets):
        ex = {"input_ids": ids[a:b], "labels": labels[a:b]}
        if pos is not None:
            ex["position_ids"] = pos[a:b]
        out.append(ex)
    return out


def build_on_node(jobs: Sequence[Job], root: Path) -> dict[str, TokenDataset]:
    """The data sets of ``jobs``: built on local rank 0 (or read from its cache), loaded
    from the files by the pod's other ranks. One process per pod: built, nothing written."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= 1:
        return {j.name: j.build() for j in jobs}
    paths = [cache_path(root, j) for j in jobs]
    if local_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for p in paths:
            _failed(p).unlink(missing_ok=True)  # an earlier attempt's, before anyone looks
    barrier()
    out: dict[str, TokenDataset] = {}
    if local_rank() == 0:
        for job, path in zip(jobs, paths, strict=True):
            out[job.name] = _build_or_reuse(job, path)
        return out
    t0 = time.monotonic()
    for job, path in zip(jobs, paths, strict=True):
        while not path.is_file():
            if _failed(path).is_file():
                _raise_failure(_failed(path))
            if graceful.requested():  # torchrun stops the pod's ranks: another one failed
                raise errors.Stopped("SIGTERM while waiting for local rank 0 to tokenize")
            time.sleep(POLL_SECONDS)
        out[job.name] = TokenDataset(load(path), job.name)
    log.info("loaded %d tokenized data set(s) from local rank 0 after %.1fs",
             len(jobs), time.monotonic() - t0)
    return out


def _build_or_reuse(job: Job, path: Path) -> TokenDataset:
    if path.is_file():
        try:
            ds = TokenDataset(load(path), job.name)
            log.info("%s: reusing tokenized data %s (%d sequences)", job.name, path.name,
                     len(ds))
            return ds
        except Exception as exc:  # e.g. a file truncated by a full disk
            log.warning("%s: cannot read cached tokens %s (%s); tokenizing again", job.name,
                        path, exc)
    t0 = time.monotonic()
    try:
        ds = job.build()
        save(path, ds.examples)
    except BaseException as exc:
        note = {"type": type(exc).__name__, "message": str(exc),
                "exitCode": int(getattr(exc, "exit_code", errors.ExitCode.INTERNAL))}
        with contextlib.suppress(OSError):  # the waiting ranks are stopped by torchrun anyway
            tmp = _failed(path).with_suffix(".tmp")
            tmp.write_text(json.dumps(note))
            os.replace(tmp, _failed(path))
        raise
    log.info("%s: tokenized on local rank 0 in %.2fs, written to %s for this node's other "
             "ranks", job.name, time.monotonic() - t0, path)
    return ds


class PeerFailed(errors.TrainerError):
    """Local rank 0 failed to build a data set: this rank stops with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        try:
            self.exit_code = errors.ExitCode(code)
        except ValueError:
            self.exit_code = errors.ExitCode.INTERNAL


def _raise_failure(note: Path) -> None:
    try:
        doc = json.loads(note.read_text())
    except (OSError, ValueError):
        doc = {"message": "local rank 0 failed to tokenize the data", "exitCode": 1}
    raise PeerFailed(f"local rank 0: {doc.get('message')}", int(doc.get("exitCode", 1)))
