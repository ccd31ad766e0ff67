package caddymodule

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

type inspectOptions struct {
	config, adapter string
	json            bool
}

// inspection is what `inspect --json` prints.
type inspection struct {
	TokenSHA256 string         `json:"token_sha256"`
	Header      map[string]any `json:"header"`
	Claims      map[string]any `json:"claims"`
	Expiry      string         `json:"expiry,omitempty"`
	Verified    *bool          `json:"verified,omitempty"`
	Verdict     string         `json:"verdict,omitempty"`
}

func inspectCommand() *cobra.Command {
	var o inspectOptions
	c := &cobra.Command{
		Use:   "inspect <jwt|@file|-> [--config <Caddyfile> [--adapter caddyfile]] [--json]",
		Short: "Decode a token without trusting it; with --config also verify it",
		Long: `Decodes a JWT without trusting it: header, claims, the act chain as a tree,
exp/nbf/iat in human time. The token itself is never printed, only its
SHA-256. With --config, it is also verified against the configured trust
blocks (as an access token); exit code 1 when it does not verify.`,
		Example: `  caddy token-exchange inspect "$TOKEN"
  caddy token-exchange inspect @token.jwt --json
  echo "$TOKEN" | caddy token-exchange inspect - --config Caddyfile`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			code, err := runInspect(cmd.Context(), args[0], o, cmd.InOrStdin(), cmd.OutOrStdout())
			if err != nil {
				fmt.Fprintln(cmd.ErrOrStderr(), "inspect:", err)
			}
			if code != 0 {
				os.Exit(code)
			}
			return nil
		},
	}
	c.Flags().StringVar(&o.config, "config", "", "also verify against this config's trust blocks")
	c.Flags().StringVar(&o.adapter, "adapter", "", "config adapter (default: caddyfile for a file named *Caddyfile*)")
	c.Flags().BoolVar(&o.json, "json", false, "print JSON")
	return c
}

func runInspect(ctx context.Context, arg string, o inspectOptions, stdin io.Reader, out io.Writer) (int, error) {
	if ctx == nil {
		ctx = context.Background()
	}
	token, err := readTokenArg(arg, stdin)
	if err != nil {
		return explainUsage, err
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return explainUsage, fmt.Errorf("not a compact JWS: %d segments, want 3", len(parts))
	}
	in := inspection{TokenSHA256: exchange.HashToken(token)}
	for i, dst := range []*map[string]any{&in.Header, &in.Claims} {
		b, err := base64.RawURLEncoding.DecodeString(parts[i])
		if err != nil || json.Unmarshal(b, dst) != nil {
			return explainUsage, fmt.Errorf("segment %d is not base64url JSON", i+1)
		}
	}
	if exp, ok := in.Claims["exp"].(float64); ok {
		in.Expiry = exchange.Relative(time.Unix(int64(exp), 0), time.Now())
	}
	code := 0
	if o.config != "" {
		cfgJSON, err := loadConfigJSON(o.config, o.adapter)
		if err != nil {
			return explainUsage, err
		}
		cctx, app, err := provisionTokenExchange(cfgJSON)
		if err != nil {
			return explainUsage, err
		}
		defer cctx.cancel()
		verified := true
		s, err := app.engine.Verify(ctx, token, "access_token")
		if err != nil {
			verified, code = false, 1
			var e *exchange.Error
			if errors.As(err, &e) {
				in.Verdict = e.Reason + ": " + e.Description
			} else {
				in.Verdict = err.Error()
			}
		} else {
			in.Verdict = fmt.Sprintf("verified: trust block %s, kid %q, thumbprint %s", s.Issuer, s.KeyID, s.KeyThumbprint)
		}
		in.Verified = &verified
	}
	if o.json {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return code, enc.Encode(in)
	}
	fmt.Fprintf(out, "token sha256: %s\n\nheader (untrusted):\n", in.TokenSHA256)
	renderTree(out, in.Header, "  ")
	fmt.Fprintln(out, "\nclaims (untrusted):")
	renderTree(out, in.Claims, "  ")
	for _, name := range []string{"exp", "nbf", "iat"} {
		if v, ok := in.Claims[name].(float64); ok {
			at := time.Unix(int64(v), 0)
			fmt.Fprintf(out, "  %s = %s (%s)\n", name, at.UTC().Format(time.RFC3339), exchange.Relative(at, time.Now()))
		}
	}
	if act, ok := in.Claims["act"].(map[string]any); ok {
		fmt.Fprintln(out, "\nact chain (outermost first):")
		renderAct(out, act, "  ")
	}
	if in.Verified != nil {
		fmt.Fprintf(out, "\n%s\n", in.Verdict)
	}
	return code, nil
}
