"""Why torchrun failed when no trainer process ran to say so.

torchrun exits 1 for its own failures too, and then no worker started and nothing wrote the
termination message: the controller would only see "exit code 1". The common ones are the
gang never forming — pod 0 waits ``rendezvousTimeoutSeconds`` for the other nodes and gives
up, or a node cannot reach pod 0's address (not running yet, DNS not resolving, a network
policy). torchrun's ``@record`` writes its own exception to ``$TORCHELASTIC_ERROR_FILE``
(workers get their own file), and the image's entrypoint runs this module on it::

    python -m orchestrator.trainer.launch_failure ERROR_FILE -- torchrun ARGS...

It writes a termination message naming the cause and what to check (exit code 69,
RendezvousTimeout / RendezvousUnreachable, retried by the controller); for any other
launcher failure it passes torchrun's own message on as TrainerError. Pure Python.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from orchestrator.api import exit_codes as X
from orchestrator.api.exit_codes import ExitCode

_JOINED = re.compile(r"(\d+)/(\d+) clients joined")
_CONNECT = re.compile(r"connect to \(([^,]+), (\d+)\)")
_UNREACHABLE = ("DistNetworkError", "RendezvousConnectionError", "client socket has timed out",
                "failed to connect")
_TIMEOUT = ("waiting for clients", "RendezvousTimeoutError")


def _option(args: list[str], name: str) -> str | None:
    """The value of torchrun's ``--name=value`` / ``--name value`` (``-`` or ``_``)."""
    spellings = {f"--{name}", f"--{name.replace('-', '_')}"}
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key in spellings:
            return value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return None


def _timeout(args: list[str]) -> str:
    for part in (_option(args, "rdzv-conf") or "").split(","):
        key, _, value = part.partition("=")
        if key.strip() in ("timeout", "join_timeout") and value:
            return value
    return "900"  # torchrun's default for the static rendezvous


def explain(error: str, args: list[str]) -> tuple[ExitCode, str, str]:
    """(exit code, reason, message) for torchrun's own exception text ``error``."""
    timeout = _timeout(args)
    node_rank = os.environ.get("JOB_COMPLETION_INDEX") or _option(args, "node-rank") or "?"
    pod = os.environ.get("POD_NAME", "this pod")
    job = os.environ.get("KUBETUNE_JOB")
    pods = f"kubectl describe pods -l kubetune.io/job={job}" if job else "kubectl describe pods"
    slow = "raise spec.distributed.rendezvousTimeoutSeconds if pods start slowly"
    # the cause and the fix first, torchrun's own line last and cut short: the controller
    # quotes at most 600 characters of a message
    first = (error.strip().splitlines() or [""])[0][:120]
    if any(s in error for s in _TIMEOUT):
        joined = _JOINED.search(error)
        got = f"{joined[1]} of {joined[2]} nodes" if joined else "not every node"
        return ExitCode.RENDEZVOUS, X.RENDEZVOUS_TIMEOUT, (
            f"the gang never formed: {got} joined the rendezvous on {pod} (node rank "
            f"{node_rank}) within {timeout} s; the other pods are not running (pending, "
            f"unschedulable, pulling the image) or cannot reach this one. Check `{pods}`; "
            f"{slow}. torchrun: {first}")
    if any(s in error for s in _UNREACHABLE):
        where = _CONNECT.search(error)
        addr = f"{where[1]}:{where[2]}" if where else (
            f"{_option(args, 'master-addr')}:{_option(args, 'master-port')}")
        return ExitCode.RENDEZVOUS, X.RENDEZVOUS_UNREACHABLE, (
            f"the gang never formed: {pod} (node rank {node_rank}) could not reach pod 0's "
            f"rendezvous at {addr} within {timeout} s; pod 0 is not running, its name does "
            f"not resolve yet, or a NetworkPolicy blocks the port. Check `{pods}`; {slow}. "
            f"torchrun: {first}")
    return ExitCode.INTERNAL, X.REASONS[ExitCode.INTERNAL], (
        f"torchrun failed before the trainer started: {first or 'no message'}")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m orchestrator.trainer.launch_failure ERROR_FILE [-- CMD...]",
              file=sys.stderr)
        return 2
    error_file, cmd = Path(args[0]), args[1:]
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    try:
        doc = json.loads(error_file.read_text())
        error = str((doc.get("message") or {}).get("message") or "")
    except (OSError, ValueError, AttributeError):
        return 0  # nothing recorded: leave the exit status as it is
    if not error:
        return 0
    from orchestrator.trainer import artifact  # the one termination-message writer

    code, reason, message = explain(error, cmd)
    print(f"[kubetune] {reason}: {message}", file=sys.stderr)
    artifact.write_termination(code, message, reason=reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
