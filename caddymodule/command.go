package caddymodule

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"
	"github.com/spf13/cobra"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "token-exchange",
		Short: "Tools for the token_exchange app (keys, test tokens)",
		Long: `
Tools for caddy-token-exchange.

  keygen  generates a private signing key (JWK) and its public JWKS, for
          signing_key_file or for a test issuer's jwks_file.
  mint    signs a subject token with a private key, as an identity provider
          would: for demos and tests only.
  explain runs one exchange against a config and prints every decision
          (or the first refusal and why); exit 0 exchanged, 1 refused, 2 error.
  inspect decodes a token without trusting it; --config also verifies it.
`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.AddCommand(keygenCommand(), mintCommand(), rotateCommand())
			cmd.AddCommand(explainCommand(), inspectCommand())
		},
	})
}

func keygenCommand() *cobra.Command {
	var alg, out, jwksOut string
	var force bool
	c := &cobra.Command{
		Use:   "keygen --out <private.jwk> [--jwks <jwks.json>] [--alg ES256] [--force]",
		Short: "Generate a signing key as a JWK, and its public JWKS",
		Example: `  caddy token-exchange keygen --out /etc/caddy/sts.jwk --jwks /etc/caddy/sts-jwks.json
  caddy token-exchange keygen --alg EdDSA --out test-idp.jwk --jwks test-idp-jwks.json`,
		RunE: func(_ *cobra.Command, _ []string) error {
			if out == "" {
				return fmt.Errorf("--out is required")
			}
			if _, err := os.Lstat(out); err == nil && !force {
				return fmt.Errorf("%s exists: refusing to replace a private key without --force", out)
			}
			key, err := exchange.GenerateSigningKey(alg)
			if err != nil {
				return err
			}
			if err := jwk.AssignKeyID(key); err != nil {
				return err
			}
			sigAlg, _ := jwa.LookupSignatureAlgorithm(alg)
			if err := key.Set(jwk.AlgorithmKey, sigAlg); err != nil {
				return err
			}
			if err := writePrivateJSONFile(out, key); err != nil {
				return err
			}
			if jwksOut != "" {
				signer, err := exchange.NewSigner(key, alg)
				if err != nil {
					return err
				}
				if err := os.WriteFile(jwksOut, signer.JWKS(), 0o644); err != nil {
					return err
				}
			}
			return nil
		},
	}
	c.Flags().StringVar(&alg, "alg", exchange.DefaultSigningAlgorithm, "signing algorithm: ES256, ES384, EdDSA, RS256, PS256")
	c.Flags().StringVar(&out, "out", "", "where to write the private JWK")
	c.Flags().StringVar(&jwksOut, "jwks", "", "where to write the public JWKS")
	c.Flags().BoolVar(&force, "force", false, "replace an existing --out file")
	return c
}

func mintCommand() *cobra.Command {
	var keyFile, algName, iss, sub, scope, clientID string
	var auds, claims []string
	var ttl time.Duration
	c := &cobra.Command{
		Use:   "mint --key <private.jwk> --iss <issuer> --sub <subject> --aud <audience> [--scope ...] [--ttl 10m] [--claim name=json]",
		Short: "Sign a subject token with a private key (demos and tests only)",
		Example: `  caddy token-exchange mint --key examples/demo-issuer/DEMO-ONLY-private-key.jwk \
    --iss https://demo-idp.example --aud http://localhost:8080 \
    --sub alice --scope "orders.read profile" --claim email=alice@example.com
  caddy token-exchange mint --key idp.jwk --iss https://idp --aud gw --sub bob --ttl -5m   # expired`,
		RunE: func(_ *cobra.Command, _ []string) error {
			if keyFile == "" || iss == "" || sub == "" || len(auds) == 0 {
				return fmt.Errorf("--key, --iss, --sub and --aud are required")
			}
			data, err := os.ReadFile(keyFile)
			if err != nil {
				return err
			}
			key, err := jwk.ParseKey(data, jwk.WithPEM(strings.HasPrefix(strings.TrimSpace(string(data)), "-----")))
			if err != nil {
				return fmt.Errorf("%s: %w", keyFile, err)
			}
			if algName == "" {
				alg, ok := key.Algorithm()
				if !ok {
					return fmt.Errorf("%s: the key has no alg; pass --alg", keyFile)
				}
				algName = alg.String()
			}
			sigAlg, ok := jwa.LookupSignatureAlgorithm(algName)
			if !ok {
				return fmt.Errorf("%s is not a signature algorithm", algName)
			}
			now := time.Now()
			tok, err := jwt.NewBuilder().
				Issuer(iss).Subject(sub).Audience(auds).
				IssuedAt(now).NotBefore(now).Expiration(now.Add(ttl)).
				JwtID(fmt.Sprintf("%d", now.UnixNano())).
				Build()
			if err != nil {
				return err
			}
			if scope != "" {
				if err := tok.Set("scope", scope); err != nil {
					return err
				}
			}
			if clientID != "" {
				if err := tok.Set("client_id", clientID); err != nil {
					return err
				}
			}
			for _, c := range claims {
				name, value, ok := strings.Cut(c, "=")
				if !ok {
					return fmt.Errorf("--claim %q: want name=value", c)
				}
				var v any = value
				if json.Valid([]byte(value)) {
					_ = json.Unmarshal([]byte(value), &v)
				}
				if err := tok.Set(name, v); err != nil {
					return err
				}
			}
			hdr := jws.NewHeaders()
			_ = hdr.Set(jws.TypeKey, "at+jwt")
			signed, err := jwt.Sign(tok, jwt.WithKey(sigAlg, key, jws.WithProtectedHeaders(hdr)))
			if err != nil {
				return err
			}
			fmt.Println(string(signed))
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&keyFile, "key", "", "private key file (JWK or PEM)")
	f.StringVar(&algName, "alg", "", "signing algorithm (default: the key's alg)")
	f.StringVar(&iss, "iss", "", "issuer (iss)")
	f.StringVar(&sub, "sub", "", "subject (sub)")
	f.StringSliceVar(&auds, "aud", nil, "audience (aud); repeatable")
	f.StringVar(&scope, "scope", "", "space-delimited scopes")
	f.StringVar(&clientID, "client-id", "", "client_id claim")
	f.StringArrayVar(&claims, "claim", nil, "extra claim as name=value (value parsed as JSON when valid); repeatable")
	f.DurationVar(&ttl, "ttl", 10*time.Minute, "lifetime; negative mints an expired token")
	return c
}

// writePrivateJSONFile writes a private key readable by its owner only
// (0600), also when the file existed with a wider mode (os.WriteFile keeps
// an existing file's mode).
func writePrivateJSONFile(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if err := f.Chmod(0o600); err != nil {
		_ = f.Close()
		return err
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}
