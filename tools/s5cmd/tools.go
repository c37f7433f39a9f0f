//go:build tools

// Package tools pins s5cmd, the fastest S3 client we know of: the storage benchmark's
// yardstick for kubetune's own transfers.
package tools

import (
	_ "github.com/peak/s5cmd/v2"
)
