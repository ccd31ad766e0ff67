// Command caddy is Caddy with the standard modules plus caddy-token-exchange,
// so the quickstart needs only the Go toolchain:
//
//	go run ./examples/caddy run --config Caddyfile.example
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/caddy-token-exchange/caddy-token-exchange/caddymodule"
	_ "github.com/caddy-token-exchange/caddy-token-exchange/examples/upstream"
)

func main() {
	caddycmd.Main()
}
