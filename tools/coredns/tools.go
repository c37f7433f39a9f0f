//go:build tools

// Package tools pins CoreDNS, the cluster DNS of the test cluster's real node
// (run as a host process bound to the pod bridge's gateway).
package tools

import (
	_ "github.com/coredns/coredns"
)
