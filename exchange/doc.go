// Package exchange is the token-exchange engine of caddy-token-exchange: it
// validates inbound JWTs against trusted issuers, applies the exchange policy
// (audience, scope down-scoping, may_act, act nesting) and mints short-lived
// RFC 9068 access tokens signed by the gateway's own key.
//
// It has no Caddy import: the Caddy module in ../caddymodule is a thin adapter
// over it, and everything here is testable with plain `go test`.
package exchange
