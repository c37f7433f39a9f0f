//go:build tools

// Package tools pins SeaweedFS (`weed`), the S3-compatible server that the storage
// benchmark and the storage tests run on loopback. SeaweedFS tags are not semver, so the
// module is pinned by pseudo-version; its own replaces keep `go install pkg@version` from
// working, hence this wrapper.
package tools

import (
	_ "github.com/seaweedfs/seaweedfs/weed"
)
