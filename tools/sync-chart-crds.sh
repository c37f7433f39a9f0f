#!/usr/bin/env bash
# Copies the generated CRDs (manifests/crds/, written by `python -m orchestrator.api.crdgen`)
# into the Helm chart's crds/ directory, byte for byte, so the chart and kustomize install
# the very same CRDs. Run it after regenerating the CRDs; tests/unit/test_helm_crds.py fails
# while the two differ.
#
#   tools/sync-chart-crds.sh          # sync
#   tools/sync-chart-crds.sh --check  # exit 1 if the chart's CRDs are stale
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="$root/manifests/crds"
dst="$root/helm/kubetune/crds"
check=false
[[ "${1:-}" == "--check" ]] && check=true

shopt -s nullglob
# Only the CRD files: crds/kustomization.yaml belongs to kustomize, not to Helm.
crds=()
for f in "$src"/*.yaml; do
  [[ "$(basename "$f")" == kustomization.yaml ]] || crds+=("$f")
done
(( ${#crds[@]} )) || { echo "no CRDs in $src (run python -m orchestrator.api.crdgen)" >&2; exit 1; }

stale=0
for f in "${crds[@]}"; do
  target="$dst/$(basename "$f")"
  if ! cmp -s "$f" "$target"; then
    stale=1
    $check || { mkdir -p "$dst"; cp "$f" "$target"; echo "synced $target"; }
  fi
done
# CRDs that were removed from manifests/crds must leave the chart too.
for target in "$dst"/*.yaml; do
  if [[ ! -e "$src/$(basename "$target")" ]]; then
    stale=1
    $check || { rm "$target"; echo "removed $target"; }
  fi
done
if $check && (( stale )); then
  echo "helm/kubetune/crds is stale: run tools/sync-chart-crds.sh" >&2
  exit 1
fi
exit 0
