#!/usr/bin/env bash
# Builds the test control plane from Go modules into $KUBETUNE_TESTBIN
# (default ~/.cache/kubetune/testbin). Each binary is rebuilt only when its
# pinned version changes, so a second run does nothing.
#
#   tools/build-testbin.sh             every binary
#   tools/build-testbin.sh NAME...     only these (e.g. `s5cmd`, which the trainer image needs)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
out="${KUBETUNE_TESTBIN:-$HOME/.cache/kubetune/testbin}"
mkdir -p "$out"
export GOFLAGS="-mod=mod -trimpath"
export CGO_ENABLED=0
start=$(date +%s)
built=0
only=("$@")
known=" "

wanted() { # wanted NAME: no names given, or NAME among them
  [[ ${#only[@]} -eq 0 ]] && return 0
  local n; for n in "${only[@]}"; do [[ $n == "$1" ]] && return 0; done
  return 1
}

# build NAME VERSION MODULE_DIR PACKAGE [LDFLAGS]
build() {
  local name=$1 version=$2 dir=$3 pkg=$4 ldflags=${5:-}
  local stamp="$out/.$name.version"
  known+="$name "
  wanted "$name" || return 0
  if [[ -x "$out/$name" && -f "$stamp" && "$(cat "$stamp")" == "$version" ]]; then
    echo "[testbin] $name $version: up to date"
    return
  fi
  local t0; t0=$(date +%s)
  echo "[testbin] building $name $version ..."
  (cd "$here/$dir" && go build -ldflags "-s -w $ldflags" -o "$out/$name.tmp" "$pkg")
  mv "$out/$name.tmp" "$out/$name"
  echo "$version" > "$stamp"
  built=1
  echo "[testbin] built $name in $(( $(date +%s) - t0 ))s"
}

kv=$KUBERNETES_VERSION
minor=$(echo "$kv" | cut -d. -f2)
k8s_ldflags=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $p.gitVersion=$kv -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  k8s_ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done

build etcd "$ETCD_VERSION" etcd .
build kube-apiserver "$kv" k8s k8s.io/kubernetes/cmd/kube-apiserver "$k8s_ldflags"
build kube-controller-manager "$kv" k8s k8s.io/kubernetes/cmd/kube-controller-manager "$k8s_ldflags"
build kube-scheduler "$kv" k8s k8s.io/kubernetes/cmd/kube-scheduler "$k8s_ldflags"
build kubectl "$kv" k8s k8s.io/kubernetes/cmd/kubectl "$k8s_ldflags"
build kwok "$KWOK_VERSION" kwok sigs.k8s.io/kwok/cmd/kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}"
build kwokctl "$KWOK_VERSION" kwok sigs.k8s.io/kwok/cmd/kwokctl "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}"
# The real node: kubelet and kube-proxy from the same module and ldflags as the
# control plane; CoreDNS as the cluster DNS.
build kubelet "$kv" k8s k8s.io/kubernetes/cmd/kubelet "$k8s_ldflags"
build kube-proxy "$kv" k8s k8s.io/kubernetes/cmd/kube-proxy "$k8s_ldflags"
# CoreDNS with only the plugins the node's Corefile uses (tools/coredns/main.go).
build coredns "$COREDNS_VERSION+minimal" coredns . \
  "-X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION"
build helm "$HELM_VERSION" helm helm.sh/helm/v3/cmd/helm "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
# The S3 server of the storage tests (they kill and restart it mid-transfer).
build weed "$SEAWEEDFS_VERSION" seaweedfs github.com/seaweedfs/seaweedfs/weed
# s5cmd: the trainer image's download engine (tools/images.sh copies this static binary into
# it, trainer_image/Dockerfile) and the storage benchmark's yardstick. Same flags and version
# stamp (.s5cmd.version) as bench/storage_throughput.py's ensure_s5cmd, which then finds it
# up to date; `s5cmd version` prints $S5CMD_VERSION-dev.
build s5cmd "$S5CMD_VERSION" s5cmd github.com/peak/s5cmd/v2 \
  "-X github.com/peak/s5cmd/v2/version.Version=$S5CMD_VERSION"

for n in "${only[@]}"; do
  [[ $known == *" $n "* ]] || { echo "[testbin] unknown binary $n (known:$known)" >&2; exit 2; }
done
total=$(( $(date +%s) - start ))
if [[ $built == 1 && ${#only[@]} -gt 0 ]]; then
  echo "[testbin] built ${only[*]} in ${total}s -> $out"
elif [[ $built == 1 ]]; then
  echo "$total" > "$out/.cold-build-seconds"
  echo "[testbin] cold build finished in ${total}s -> $out"
else
  echo "[testbin] all binaries up to date (${total}s) -> $out"
fi
