// Command coredns is the cluster DNS of the test cluster's real node (a host process bound
// to the pod bridge's gateway): CoreDNS with only the plugins its Corefile uses
// (tools/node.sh). The stock build links every plugin, cloud SDKs included, and took
// five of a cold CI's minutes to compile; this one needs a fraction of that.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The plugin chain in CoreDNS's own order (its plugin.cfg): a request passes them top down.
func init() {
	dnsserver.Directives = []string{"bind", "ready", "errors", "cache", "kubernetes"}
}

func main() {
	coremain.Run()
}
