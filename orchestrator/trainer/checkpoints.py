"""Checkpoints in the output store, so a restarted attempt resumes where the last one stopped.

Layout under ``checkpoint_uri`` (default ``<output.uri>/<job>/checkpoints/``)::

    checkpoint-<step>/node-<k>/...   HF Trainer checkpoint dir as node k saw it (DeepSpeed
                                     shards of its ranks; node 0 adds trainer_state.json ...)
    latest.json                      {"step", "name", "nodes", "specFingerprint", "worldSize"}

Each node's local rank 0 uploads what its node wrote (nodes need not share a filesystem);
global rank 0 writes ``latest.json`` only after every node finished, so ``latest.json``
always names a complete checkpoint. Older checkpoints are deleted after that.
On resume every node downloads all ``node-*`` parts of the latest checkpoint into one local
directory (identical files simply overwrite each other).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import storage
from orchestrator.trainer.artifact import upload_with_retries
from orchestrator.trainer.errors import storage_failure

log = logging.getLogger("orchestrator.trainer")

LATEST = "latest.json"


@dataclass(frozen=True)
class Latest:
    step: int
    name: str
    nodes: int
    spec_fingerprint: str
    world_size: int


def _join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def read_latest(checkpoint_uri: str) -> Latest | None:
    try:
        doc = json.loads(storage.read_text(_join(checkpoint_uri, LATEST)))
        return Latest(int(doc["step"]), str(doc["name"]), int(doc["nodes"]),
                      str(doc["specFingerprint"]), int(doc["worldSize"]))
    except storage.ObjectNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable %s: %s", _join(checkpoint_uri, LATEST), exc)
        return None


def upload_node_part(local_ckpt: Path, checkpoint_uri: str, node: int) -> None:
    upload_with_retries(local_ckpt, _join(checkpoint_uri, local_ckpt.name, f"node-{node}"),
                        what=f"checkpoint {local_ckpt.name}")


def publish(checkpoint_uri: str, step: int, name: str, nodes: int, fingerprint: str,
            world_size: int, keep: int = 1) -> None:
    """Mark ``name`` as the latest complete checkpoint; delete all but the newest ``keep``
    older ones."""
    doc = {"step": step, "name": name, "nodes": nodes, "specFingerprint": fingerprint,
           "worldSize": world_size}
    try:
        storage.write_text(_join(checkpoint_uri, LATEST), json.dumps(doc, indent=2) + "\n")
    except storage.StorageError as exc:
        raise storage_failure(exc, f"cannot write {_join(checkpoint_uri, LATEST)}",
                              "spec.output.uri") from None
    log.info("checkpoint %s (step %d) is complete in %s", name, step, checkpoint_uri)
    try:
        found = {_step_of(o.key) for o in storage.list_objects(checkpoint_uri)}
        steps = sorted((s for s in found if s is not None and s < step), reverse=True)
        for old in steps[keep:]:
            storage.delete_prefix(_join(checkpoint_uri, f"checkpoint-{old}"))
    except storage.StorageError as exc:  # stale checkpoints cost space, not correctness
        log.warning("could not prune old checkpoints under %s: %s", checkpoint_uri, exc)


def _step_of(key: str) -> int | None:
    for part in key.split("/"):
        if part.startswith("checkpoint-") and part[len("checkpoint-"):].isdigit():
            return int(part[len("checkpoint-"):])
    return None


def download(checkpoint_uri: str, latest: Latest, dest_root: Path) -> Path:
    """Merge every node part of ``latest`` into ``dest_root/<name>``."""
    dest = dest_root / latest.name
    for node in range(latest.nodes):
        storage.download_dir(_join(checkpoint_uri, latest.name, f"node-{node}"), dest,
                             require_manifest=True, progress=False)
    for extra in (storage.MANIFEST_NAME, storage.CHECKSUMS_NAME):
        (dest / extra).unlink(missing_ok=True)  # not part of the HF checkpoint
    return dest


def node_index() -> int:
    """This pod's node rank (torchrun sets GROUP_RANK; also derivable from RANK)."""
    if "GROUP_RANK" in os.environ:
        return int(os.environ["GROUP_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")) // max(local_world, 1)


def num_nodes() -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return max(world // max(local_world, 1), 1)


def summary(latest: Latest | None) -> dict[str, Any] | None:
    return None if latest is None else {"step": latest.step, "name": latest.name}
