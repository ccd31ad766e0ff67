package caddymodule

import (
	"path/filepath"
	"testing"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// newTestIdP is the identity provider of the in-process gateway tests: a
// real issuer with an RS256 key "rsa-1" and an ES256 key "ec-1", its JWKS
// served over HTTP.
func newTestIdP(t *testing.T, iss string) *testidp.Issuer {
	t.Helper()
	idp := testidp.New(t, iss)
	idp.AddKey("rsa-1", "RS256")
	idp.AddKey("ec-1", "ES256")
	return idp
}

// caddyFixture is one test Caddy's own files: the DEBUG log that tests scan
// for leaked tokens, and its storage. The integration, endpoint, attack and
// fault tests build their gateways with it.
type caddyFixture struct {
	logFile, storage string
}

func newCaddyFixture(t *testing.T) caddyFixture {
	return caddyFixture{logFile: filepath.Join(t.TempDir(), "caddy.log"), storage: t.TempDir()}
}

// globals are the global options that every test Caddy shares, pointing at
// the fixture's log and storage (see testGlobalOptions).
func (f caddyFixture) globals() string {
	return testGlobalOptions(f.logFile, f.storage)
}

// start runs config (a Caddyfile whose global options include f.globals())
// in real, in-process Caddy, in front of upstream (may be nil) and trusting
// idp.
func (f caddyFixture) start(t *testing.T, config string, idp *testidp.Issuer, upstream *recordingUpstream) *gateway {
	t.Helper()
	tester := caddytest.NewTester(t)
	tester.InitServer(config, "caddyfile")
	return &gateway{tester: tester, idp: idp, upstream: upstream, logFile: f.logFile}
}
