//go:build tools

// Package tools pins the Kubernetes control-plane binaries that the kubetune
// test cluster runs, and the kubelet and kube-proxy of its real node. Built
// with `go build k8s.io/kubernetes/cmd/...` from here.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubectl/pkg/cmd"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
