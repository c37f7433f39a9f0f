#!/usr/bin/env bash
# Runs the given command (normally the rendered `torchrun ... -m orchestrator.trainer --config`)
# and makes the container's exit status the trainer's own exit code.
#
# torchrun exits 1 whenever a worker fails, which would hide the trainer's documented codes
# (65 data, 66 model, 74 storage, 78 config, 80 pruned); the worker wrote the real code into the
# termination message, so re-raise it from there. With no arguments, run one process per GPU
# on a single node.
set -uo pipefail

TERMINATION_LOG="${KUBETUNE_TERMINATION_LOG:-/dev/termination-log}"

if [ "$#" -eq 0 ]; then
  set -- torchrun --standalone --nproc-per-node="${KUBETUNE_NPROC:-gpu}" \
    -m orchestrator.trainer --config "${KUBETUNE_CONFIG:-/etc/kubetune/config.json}"
fi

"$@"
rc=$?
if [ "$rc" -ne 0 ] && [ -s "$TERMINATION_LOG" ]; then
  code=$(python -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["exitCode"]))' \
         "$TERMINATION_LOG" 2>/dev/null) && [ -n "$code" ] && [ "$code" -ne 0 ] && rc=$code
fi
exit "$rc"
