#!/usr/bin/env bash
# Prints N fake GPU node manifests (kwok-managed) on stdout.
set -euo pipefail
n=${1:-4}
for i in $(seq 0 $((n - 1))); do
cat <<YAML
---
apiVersion: v1
kind: Node
metadata:
  name: gpu-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/hostname: gpu-node-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    node.kubernetes.io/instance-type: fake-8xh100
    nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3
    topology.kubernetes.io/zone: zone-$((i % 2))
spec: {}
status:
  capacity: {cpu: "96", memory: 1000Gi, pods: "110", nvidia.com/gpu: "8", ephemeral-storage: 2Ti}
  allocatable: {cpu: "94", memory: 980Gi, pods: "110", nvidia.com/gpu: "8", ephemeral-storage: 2Ti}
YAML
done
