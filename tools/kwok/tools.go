//go:build tools

// Package tools pins kwok and kwokctl (fake nodes for the test cluster).
package tools

import (
	_ "sigs.k8s.io/kwok/cmd/kwok"
	_ "sigs.k8s.io/kwok/cmd/kwokctl"
)
