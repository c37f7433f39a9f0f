// Command etcd is the upstream etcd server built from go.etcd.io/etcd/server/v3.
// etcd's own root module carries relative replaces, so it cannot be
// `go install`ed; this wrapper pins the published modules instead.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
