#!/usr/bin/env bash
# Starts / stops the kubetune test cluster: kwokctl with `runtime: binary`
# pointed only at the binaries built by build-testbin.sh (nothing downloaded),
# plus fake GPU nodes, and with KUBETUNE_REAL_NODES=1 a real kubelet node (tools/node.sh).
# `up` prints KUBECONFIG=<path> as its last line; `env` prints the KEY=VALUE lines tests use.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/versions.env"
bin="${KUBETUNE_TESTBIN:-$HOME/.cache/kubetune/testbin}"
name="${KUBETUNE_CLUSTER:-kubetune-test}"
nodes="${KUBETUNE_NODES:-8}"
export KWOK_WORKDIR="${KWOK_WORKDIR:-$HOME/.cache/kubetune/kwok}"
kubeconfig="$KWOK_WORKDIR/clusters/$name/kubeconfig.yaml"
# The real node's pod bridge gateway (tools/node.sh): pods reach the API server there.
node_subnet="${KUBETUNE_NODE_SUBNET:-10.244.7.0/24}"
node_gateway="${node_subnet%.*}.1"

config() {
  cat <<YAML
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokctlConfiguration
options:
  runtime: binary
  kubeVersion: $KUBERNETES_VERSION
  kubeAuthorization: true
  kubeApiserverBinary: $bin/kube-apiserver
  kubeControllerManagerBinary: $bin/kube-controller-manager
  kubeSchedulerBinary: $bin/kube-scheduler
  kubectlBinary: $bin/kubectl
  etcdBinary: $bin/etcd
  kwokControllerBinary: $bin/kwok
  cacheDir: $KWOK_WORKDIR/cache
  nodeLeaseDurationSeconds: 40
  disableQPSLimits: true
  # In-cluster clients (the controller pod) reach the API server through the `kubernetes`
  # Service (10.0.0.1) or the bridge gateway: both must be in its serving certificate.
  kubeApiserverCertSANs: [10.0.0.1, $node_gateway]
componentsPatches:
# kwokctl's binary runtime starts kwok with --manage-all-nodes=true, which would also play
# the real node (fake its status, take its lease, patch its pods): only the fake nodes.
- name: kwok-controller
  extraArgs:
  - {key: manage-all-nodes, value: "false", override: true}
  - {key: manage-nodes-with-annotation-selector, value: kwok.x-k8s.io/node=fake}
# Reach real kubelets by their InternalIP (their hostname does not resolve).
- name: kube-apiserver
  extraArgs:
  - {key: kubelet-preferred-address-types, value: "InternalIP,Hostname"}
  - {key: advertise-address, value: "$node_gateway"}
YAML
  echo "---"
  cat "$here/cluster/stages.yaml"
}

case "${1:-}" in
  up)
    "$here/build-testbin.sh" >&2
    t0=$(date +%s%3N)
    if "$bin/kwokctl" get clusters 2>/dev/null | grep -qx "$name"; then
      if "$bin/kubectl" --kubeconfig "$kubeconfig" get --raw /readyz >/dev/null 2>&1; then
        echo "[cluster] $name is already running; reusing it" >&2
      else
        # left over from a machine restart or a killed session: start clean, never from stale state
        echo "[cluster] $name exists but is not running; recreating it" >&2
        "$bin/kwokctl" delete cluster --name "$name" >&2 || true
      fi
    fi
    if ! "$bin/kwokctl" get clusters 2>/dev/null | grep -qx "$name"; then
      cfg="$(mktemp)"; config > "$cfg"
      "$bin/kwokctl" create cluster --name "$name" --config "$cfg" --wait 120s >&2
      rm -f "$cfg"
    fi
    # Nothing may have been fetched from the network: kwokctl's download cache stays empty.
    if [[ -d "$KWOK_WORKDIR/cache" ]] && find "$KWOK_WORKDIR/cache" -type f | grep -q .; then
      echo "[cluster] ERROR: kwokctl downloaded files into $KWOK_WORKDIR/cache" >&2; exit 1
    fi
    "$here/cluster/nodes.sh" "$nodes" | "$bin/kubectl" --kubeconfig "$kubeconfig" apply -f - >&2
    "$bin/kubectl" --kubeconfig "$kubeconfig" wait --for=condition=Ready node -l type=kwok --timeout=60s >&2
    if [[ "${KUBETUNE_REAL_NODES:-0}" == 1 ]]; then
      "$here/node.sh" up "$kubeconfig"
    fi
    t1=$(date +%s%3N)
    echo "[cluster] $name up with $nodes GPU nodes in $(( (t1 - t0) / 1000 )).$(( (t1 - t0) % 1000 / 100 ))s" >&2
    echo "KUBECONFIG=$kubeconfig"
    ;;
  down)
    # The real node first: its kubelet tears pods down through the API server.
    "$here/node.sh" down
    "$bin/kwokctl" delete cluster --name "$name" >&2 || true
    ;;
  kubeconfig)
    echo "$kubeconfig"
    ;;
  env)
    echo "KUBECONFIG=$kubeconfig"
    "$here/node.sh" env
    ;;
  *)
    echo "usage: $0 up|down|kubeconfig|env" >&2; exit 2
    ;;
esac
