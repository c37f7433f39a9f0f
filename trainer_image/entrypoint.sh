#!/usr/bin/env bash
# Runs the given command (normally the rendered `torchrun ... -m orchestrator.trainer --config`)
# and makes the container's exit status the trainer's own exit code.
#
# Signals: tini (PID 1) delivers the kubelet's SIGTERM to this script only, so it is passed on
# to the command; torchrun forwards it to its workers, which checkpoint at the next step
# boundary and exit within terminationGracePeriodSeconds (docs/trainer.md).
#
# torchrun exits 1 whenever a worker fails, which would hide the trainer's documented codes
# (65 data, 66 model, 73 output, 74 storage, 78 config, 80 pruned); the worker wrote the real code into the
# termination message, so re-raise it from there. When torchrun failed before any worker
# ran, orchestrator.trainer.launch_failure writes that message from torchrun's error file.
# With no arguments, run one process per GPU on a single node.
set -uo pipefail

TERMINATION_LOG="${KUBETUNE_TERMINATION_LOG:-/dev/termination-log}"
# torchrun records its own failure here (a rendezvous that never completes, pod 0
# unreachable): no worker ran to write the termination message, so one is written from it.
export TORCHELASTIC_ERROR_FILE="${TORCHELASTIC_ERROR_FILE:-${KUBETUNE_WORKDIR:-/workspace}/.torchrun-error.json}"
rm -f "$TORCHELASTIC_ERROR_FILE"

if [ "$#" -eq 0 ]; then
  set -- torchrun --standalone --nproc-per-node="${KUBETUNE_NPROC:-gpu}" \
    -m orchestrator.trainer --config "${KUBETUNE_CONFIG:-/etc/kubetune/config.json}"
fi

"$@" &
child=$!
forward() { kill -s "$1" "$child" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT
# `wait` returns early (status > 128) when a trapped signal arrives: wait again until the
# command itself has exited, so its own status is the one reported.
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break
done
if [ "$rc" -ne 0 ] && [ ! -s "$TERMINATION_LOG" ] && [ -s "$TORCHELASTIC_ERROR_FILE" ]; then
  python -m orchestrator.trainer.launch_failure "$TORCHELASTIC_ERROR_FILE" -- "$@" || true
fi
if [ "$rc" -ne 0 ] && [ -s "$TERMINATION_LOG" ]; then
  code=$(python -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["exitCode"]))' \
         "$TERMINATION_LOG" 2>/dev/null) && [ -n "$code" ] && [ "$code" -ne 0 ] && rc=$code
fi
exit "$rc"
