// Command zitadel-sts serves the zitadel/oidc v3 example OpenID Provider
// as a third-party RFC 8693 token service (see internal/zitadelsts): it
// accepts subject tokens signed by a key in -jwks-file for -trust-issuer
// and -trust-audience, authenticates one client (-client-id,
// -client-secret, compared in plain text as the example storage does) and
// answers token exchanges at <issuer>/oauth/token with zitadel's opaque
// bearer access tokens. examples/loadbench runs it as its third-party STS:
//
//	go run ./examples/zitadel-sts -addr 127.0.0.1:9998 -jwks-file jwks.json \
//	  -trust-issuer https://idp.bench -trust-audience https://gateway.bench
//
// The OP logs one line per request (the example's middleware) to stderr;
// -quiet drops info lines.
package main

import (
	"flag"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"

	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/zitadel/oidc/v3/example/server/storage"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/zitadelsts"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9998", "listen address")
	issuer := flag.String("issuer", "", "the OP's issuer (default http://<addr>)")
	jwksFile := flag.String("jwks-file", "", "JWKS of the trusted subject-token issuer (keys with alg) (required)")
	trustIss := flag.String("trust-issuer", "", "iss of accepted subject tokens (required)")
	trustAud := flag.String("trust-audience", "", "aud accepted subject tokens must contain (required)")
	clientID := flag.String("client-id", "gateway", "the client allowed to exchange")
	clientSecret := flag.String("client-secret", "gateway-secret", "its secret (plain text, as the example storage compares it)")
	quiet := flag.Bool("quiet", false, "log warnings and errors only")
	flag.Parse()
	if *jwksFile == "" || *trustIss == "" || *trustAud == "" {
		log.Fatal("-jwks-file, -trust-issuer and -trust-audience are required")
	}
	data, err := os.ReadFile(*jwksFile)
	if err != nil {
		log.Fatal(err)
	}
	keys, err := jwk.Parse(data)
	if err != nil {
		log.Fatal(err)
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	iss := *issuer
	if iss == "" {
		iss = "http://" + ln.Addr().String()
	}
	st := zitadelsts.NewStorage(iss, map[string]*storage.Client{
		*clientID: storage.WebClient(*clientID, *clientSecret),
	}, zitadelsts.Trust{Issuer: *trustIss, Audience: *trustAud, Keys: keys})
	var logger *slog.Logger
	if *quiet {
		logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	log.Printf("zitadel example OP as STS: issuer %s, token endpoint %s/oauth/token", iss, iss)
	log.Fatal(http.Serve(ln, zitadelsts.Handler(iss, st, logger)))
}
