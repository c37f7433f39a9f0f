//go:build tools

// Package tools pins s5cmd, the fastest S3 client we know of: the trainer image's download
// engine (trainer_image/Dockerfile) and the storage benchmark's yardstick for kubetune's own
// transfers.
package tools

import (
	_ "github.com/peak/s5cmd/v2"
)
