#!/usr/bin/env bash
# The test cluster's real node: a kubelet running real containers next to the kwok GPU
# nodes, on this machine. Needs root and `make node-deps` (containerd, runc, CNI plugins).
#
#   tools/node.sh up KUBECONFIG    start containerd, the pod bridge, CoreDNS, the S3 server,
#                                  kubelet and kube-proxy; wait for the node to be Ready
#   tools/node.sh down [KUBECONFIG] stop all of it and undo every change made to the host
#   tools/node.sh env              KEY=VALUE lines for tests (S3 endpoints, images, node)
#
# Everything is parametrised (KUBETUNE_NODE_* below) and idempotent: `up` on a running node
# does nothing, `down` on a stopped one does nothing. Network rule of this workplace: the
# node's processes listen only on loopback and on the bridge gateway, and pods route only to
# their own subnet and the service range (there is no default route out of a pod).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${KUBETUNE_TESTBIN:-$HOME/.cache/kubetune/testbin}"
node="${KUBETUNE_NODE_NAME:-real-0}"
cluster="${KUBETUNE_CLUSTER:-kubetune-test}"                   # the cluster the node joins
bridge="${KUBETUNE_NODE_BRIDGE:-ktbr0}"
subnet="${KUBETUNE_NODE_SUBNET:-10.244.7.0/24}"
service_cidr="${KUBETUNE_SERVICE_CIDR:-10.0.0.0/24}"
s3_port="${KUBETUNE_NODE_S3_PORT:-9000}"
venv_bin="${KUBETUNE_VENV_BIN:-$(dirname "$here")/.venv/bin}"
run="${KUBETUNE_NODE_RUN:-/run/kubetune-node/$node}"          # runtime state, gone at down
cache="${KUBETUNE_NODE_CACHE:-$HOME/.cache/kubetune/node}"     # containerd images, kept
prefix="${subnet%.*}"; gw="$prefix.1"; mask="${subnet#*/}"
sock="$run/containerd/containerd.sock"
KUBECTL="$bin/kubectl"

log() { echo "[node] $*" >&2; }
die() { echo "[node] ERROR: $*" >&2; exit 1; }
ms() { date +%s%3N; }

# Host paths the kubelet, containerd and libcni use whatever their configuration says; `down`
# removes those that did not exist before `up`.
HOST_PATHS=(/var/lib/kubelet /var/log/containers /var/log/pods /run/containerd /var/lib/cni /run/mount)
SYSCTLS=(net.ipv4.ip_forward vm.overcommit_memory kernel.panic kernel.panic_on_oops
         net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables
         net.ipv4.conf.all.route_localnet)

pid_alive() { [[ -f "$run/$1.pid" ]] && kill -0 "$(cat "$run/$1.pid")" 2>/dev/null; }

start() { # start NAME CMD... : background process with its log and pid under $run
  local name=$1; shift
  if pid_alive "$name"; then return; fi
  nohup "$@" > "$run/logs/$name.log" 2>&1 &
  echo $! > "$run/$name.pid"
}

stop() { # stop NAME: TERM, then KILL after 15 s
  local name=$1 p
  [[ -f "$run/$name.pid" ]] || return 0
  p=$(cat "$run/$name.pid")
  if kill -0 "$p" 2>/dev/null; then
    kill "$p" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$p" 2>/dev/null || true
    log "stopped $name ($p)"
  fi
  rm -f "$run/$name.pid"
}

wait_until() { # wait_until SECONDS WHAT CMD...
  local t=$1 what=$2; shift 2
  local end=$(( $(date +%s) + t ))
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) < end )) || die "timed out after ${t}s waiting for $what (logs: $run/logs)"
    sleep 0.2
  done
}

preflight() {
  [[ $EUID -eq 0 ]] || die "the real node needs root (network namespaces, mounts, iptables)"
  local missing=()
  for b in containerd runc ctr iptables ip conntrack; do command -v "$b" >/dev/null || missing+=("$b"); done
  [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/portmap ]] \
    || missing+=(containernetworking-plugins)
  [[ ${#missing[@]} -eq 0 ]] || die "missing ${missing[*]}: run 'make node-deps'"
  for b in kubelet kube-proxy coredns; do
    [[ -x "$bin/$b" ]] || die "$bin/$b missing: run 'make testbin'"
  done
}

record_baseline() { # once per up/down cycle: what the host looked like before
  [[ -f "$run/baseline" ]] && return
  {
    for s in "${SYSCTLS[@]}"; do
      v=$(sysctl -n "$s" 2>/dev/null) && echo "sysctl $s $v"
    done
    for p in "${HOST_PATHS[@]}"; do [[ -e $p ]] && echo "path $p"; done
    for ipt in iptables ip6tables; do
      for t in filter nat mangle; do
        $ipt-save -t $t 2>/dev/null | sed -n "s/^:\([^ ]*\) .*/chain $ipt $t \1/p"
      done
    done
    grep -q '^br_netfilter ' /proc/modules && echo "module br_netfilter"
    true
  } > "$run/baseline"
}

write_configs() {
  local kubeconfig=$1
  mkdir -p "$run"/{containerd,cni/net.d,cni/ipam,kubelet/root,kubelet/pki,kubelet/pod-logs,kubelet/plugins,logs,coredns}
  mkdir -p "$cache/containerd"
  cp "$kubeconfig" "$run/kubeconfig"
  : > "$run/kubelet/resolv.conf"   # no upstream DNS exists for pods
  cat > "$run/containerd/config.toml" <<EOF
version = 2
root = "$cache/containerd"
state = "$run/containerd/state"
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$run/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/kubetune/pause:1"
  enable_selinux = false
  netns_mounts_under_state_dir = true
  # this VM lacks CAP_SYS_RESOURCE, so negative oom_score_adj values cannot be applied
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = false
        Root = "$run/containerd/runc"
  # No image registry is reachable from this machine: every image is imported. A pull of
  # anything else tries a closed local port first (containerd then falls back to the
  # registry's own host, unreachable here), so it ends in ErrImagePull without a wait.
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
    endpoint = ["http://127.0.0.1:9"]
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."*"]
    endpoint = ["http://127.0.0.1:9"]
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$run/cni/net.d"
    max_conf_num = 1
EOF
  cat > "$run/cni/net.d/10-kubetune.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "kubetune-$node",
  "plugins": [
    {"type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$run/cni/ipam",
              "ranges": [[{"subnet": "$subnet", "gateway": "$gw"}]],
              "routes": [{"dst": "$service_cidr"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
EOF
  cat > "$run/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$sock
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
cgroupsPerQOS: true
enforceNodeAllocatable: ["pods"]
# Serves only on the bridge gateway; the test apiserver has no kubelet client certificate,
# so it is admitted anonymously (test clusters only).
address: $gw
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
podLogsDir: $run/kubelet/pod-logs
volumePluginDir: $run/kubelet/plugins
resolvConf: $run/kubelet/resolv.conf
clusterDomain: cluster.local
clusterDNS: ["$gw"]
podCIDR: $subnet
maxPods: 60
# A shared machine: never evict or collect images because of other workloads.
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
nodeStatusReportFrequency: 10s
oomScoreAdj: 0
# No KUBE-FIREWALL / canary chains in the host's iptables.
makeIPTablesUtilChains: false
EOF
  cat > "$run/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $run/kubeconfig}
hostnameOverride: $node
bindAddress: $gw
clusterCIDR: $subnet
mode: iptables
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
nodePortAddresses: ["$gw/32"]
iptables: {localhostNodePorts: false}
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  cat > "$run/coredns/Corefile" <<EOF
.:53 {
    bind $gw
    errors
    ready 127.0.0.1:18181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $run/kubeconfig
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
}
EOF
}

up() {
  local kubeconfig=${1:?usage: $0 up KUBECONFIG}
  preflight
  if pid_alive kubelet && [[ "$(KUBECONFIG=$kubeconfig "$KUBECTL" get node "$node" \
       -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]; then
    log "$node is already up"; return 0
  fi
  local t0; t0=$(ms)
  mkdir -p "$run"
  echo "$cluster" > "$run/cluster"
  record_baseline
  write_configs "$kubeconfig"
  export KUBECONFIG=$kubeconfig

  # The bridge exists before the kubelet so that it can serve on the gateway address.
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge
    ip addr add "$gw/$mask" dev "$bridge"
    ip link set "$bridge" up
  fi

  start containerd containerd --config "$run/containerd/config.toml"
  wait_until 30 containerd ctr -a "$sock" version
  "$here/images.sh" import "$sock"
  local refs; refs=$(ctr -a "$sock" -n k8s.io images ls -q)
  grep -qxF localhost/kubetune/pause:1 <<<"$refs" || die "the pause image is missing: run 'make images'"

  start coredns "$bin/coredns" -conf "$run/coredns/Corefile"
  wait_until 30 CoreDNS curl -fsS http://127.0.0.1:18181/ready

  if [[ -x "$venv_bin/moto_server" ]]; then
    start s3 "$venv_bin/moto_server" -H "$gw" -p "$s3_port"
    wait_until 30 "the S3 server" curl -s -o /dev/null "http://$gw:$s3_port/"
  else
    log "no moto_server in $venv_bin: S3 endpoint for pods not started (run 'make venv')"
  fi

  start kubelet "$bin/kubelet" --config="$run/kubelet/config.yaml" \
    --kubeconfig="$run/kubeconfig" --hostname-override="$node" --node-ip="$gw" \
    --root-dir="$run/kubelet/root" --cert-dir="$run/kubelet/pki" \
    --node-labels="kubetune.io/real-node=true,type=real" \
    --register-with-taints="kubetune.io/real-node=true:NoSchedule" --v=1
  start kube-proxy "$bin/kube-proxy" --config="$run/kube-proxy.yaml" --v=1
  wait_until 60 "node $node to register" "$KUBECTL" get node "$node"
  "$KUBECTL" wait --for=condition=Ready "node/$node" --timeout=60s >/dev/null \
    || die "node $node not Ready (see $run/logs/kubelet.log)"
  local t1; t1=$(ms)
  log "$node Ready in $(( (t1 - t0) / 1000 )).$(( (t1 - t0) % 1000 / 100 ))s (bridge $bridge $subnet, DNS $gw)"
}

delete_pods() { # let the kubelet tear pods down (CNI DEL) while it still runs
  [[ -f "$run/kubeconfig" ]] && pid_alive kubelet || return 0
  KUBECONFIG="$run/kubeconfig" timeout 90 "$KUBECTL" delete pods -A \
    --field-selector "spec.nodeName=$node" --grace-period=5 --wait=true --timeout=60s \
    >/dev/null 2>&1 || true
  local end=$(( $(date +%s) + 30 ))
  while (( $(date +%s) < end )); do
    [[ "$(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null | wc -l)" == 0 ]] && break
    sleep 0.5
  done
}

down() {
  [[ -d "$run" ]] || return 0
  if [[ -f "$run/cluster" && "$(cat "$run/cluster")" != "$cluster" ]]; then
    log "$node belongs to cluster $(cat "$run/cluster"), not $cluster: left running"; return 0
  fi
  delete_pods
  KUBECONFIG="$run/kubeconfig" timeout 30 "$KUBECTL" delete node "$node" --wait=false \
    >/dev/null 2>&1 || true
  stop kube-proxy
  timeout 60 "$bin/kube-proxy" --cleanup >"$run/logs/kube-proxy-cleanup.log" 2>&1 || true
  stop kubelet
  # Whatever the kubelet left: kill tasks, remove containers; their netns go with them.
  if pid_alive containerd; then
    local c
    for c in $(ctr -a "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr -a "$sock" -n k8s.io tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
    done
    sleep 0.5
    for c in $(ctr -a "$sock" -n k8s.io containers ls -q 2>/dev/null); do
      ctr -a "$sock" -n k8s.io tasks rm -f "$c" >/dev/null 2>&1 || true
      ctr -a "$sock" -n k8s.io containers rm "$c" >/dev/null 2>&1 || true
    done
  fi
  stop containerd
  stop coredns
  stop s3
  # Mounts under the node's directories, deepest first (pod volumes, netns, rootfs).
  local m
  for _ in 1 2 3; do
    for m in $(awk -v r="$run" -v c="$cache" 'index($5, r) == 1 || index($5, c) == 1 {print $5}' \
                 /proc/self/mountinfo | sort -r); do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  done
  # Network: veths left on the bridge, the bridge, the chains kube-proxy and CNI added.
  for m in $(ip -o link show master "$bridge" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
    ip link del "$m" 2>/dev/null || true
  done
  ip link del "$bridge" 2>/dev/null || true
  local ipt t chain new
  for ipt in iptables ip6tables; do
    for t in filter nat mangle; do
      new=$($ipt-save -t $t 2>/dev/null | sed -n 's/^:\(CNI-[^ ]*\|KUBE-[^ ]*\) .*/\1/p' \
            | while read -r chain; do
                grep -qx "chain $ipt $t $chain" "$run/baseline" 2>/dev/null || echo "$chain"
              done)
      [[ -n $new ]] || continue
      for chain in $new; do   # jumps into the chain, then its rules, then the chain
        $ipt -t $t -S 2>/dev/null | grep -E -- "-j $chain( |$)" | sed 's/^-A/-D/' \
          | while read -r rule; do
              # shellcheck disable=SC2086
              $ipt -t $t $rule 2>/dev/null || true
            done
      done
      for chain in $new; do $ipt -t $t -F "$chain" 2>/dev/null || true; done
      for chain in $new; do $ipt -t $t -X "$chain" 2>/dev/null || true; done
    done
  done
  # The host as it was: sysctls, paths the agents created, br_netfilter.
  if [[ -f "$run/baseline" ]]; then
    local kind a b
    while read -r kind a b; do
      [[ $kind == sysctl ]] && sysctl -q -w "$a=$b" 2>/dev/null || true
    done < "$run/baseline"
    for m in "${HOST_PATHS[@]}"; do
      grep -qx "path $m" "$run/baseline" || rm -rf "$m"
    done
    if ! grep -qx "module br_netfilter" "$run/baseline" && grep -q '^br_netfilter ' /proc/modules; then
      modprobe -r br_netfilter 2>/dev/null || true
    fi
  fi
  rm -rf "$run"
  rmdir "$(dirname "$run")" 2>/dev/null || true
  log "$node down; host restored"
}

env_() {
  local images; images=$("$here/images.sh" names)
  echo "REAL_NODE=$node"
  echo "S3_ENDPOINT=http://$gw:$s3_port"
  echo "S3_ENDPOINT_HOST=http://$gw:$s3_port"
  echo "AWS_ACCESS_KEY_ID=kubetune-test"
  echo "AWS_SECRET_ACCESS_KEY=kubetune-test-secret"
  echo "TRAINER_IMAGE=$(sed -n 's/^trainer=//p' <<<"$images")"
  echo "CONTROLLER_IMAGE=$(sed -n 's/^controller=//p' <<<"$images")"
  echo "BASE_IMAGE=$(sed -n 's/^base=//p' <<<"$images")"
  echo "NODE_GATEWAY=$gw"
  # the S3 server's request log (one line per request): what pods fetched, counted by tests
  echo "S3_LOG=$run/logs/s3.log"
}

case "${1:-}" in
  up) up "${2:-}" ;;
  down) down ;;
  env) env_ ;;
  *) echo "usage: $0 up KUBECONFIG | down | env" >&2; exit 2 ;;
esac
