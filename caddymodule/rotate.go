package caddymodule

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

// rotateCommand is `caddy token-exchange rotate`: a new signing key now, in
// the storage the config names, for every instance that shares it.
func rotateCommand() *cobra.Command {
	var configFile, adapter string
	var now bool
	c := &cobra.Command{
		Use:   "rotate --config <Caddyfile> [--adapter caddyfile] [--now]",
		Short: "Rotate the gateway's signing key in its storage",
		Long: `Adds a new signing key to the issuer's key set in the storage the config
names. Running instances pick it up within their re-read interval.

By default the new key is published first and signs only after
key_publish_ahead, like a scheduled rotation: verifiers have fetched it by then.

--now is for a compromised key: the new key signs at once and every other key
is withdrawn at once, so tokens they signed stop verifying.`,
		Example: `  caddy token-exchange rotate --config Caddyfile
  caddy token-exchange rotate --config caddy.json --adapter "" --now`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if configFile == "" {
				return errors.New("--config is required")
			}
			cfgJSON, _, _, err := caddycmd.LoadConfig(configFile, adapter)
			if err != nil {
				return err
			}
			var cfg caddy.Config
			if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
				return fmt.Errorf("decoding config: %w", err)
			}
			cfg.Admin = &caddy.AdminConfig{Disabled: true}
			ctx, err := caddy.ProvisionContext(&cfg)
			if err != nil {
				return err
			}
			// The process ends right after: Caddy's cleanup of this context is
			// not needed.
			v, err := ctx.AppIfConfigured("token_exchange")
			if err != nil {
				return fmt.Errorf("the config has no token_exchange global option: %w", err)
			}
			app := v.(*App)
			if app.keys == nil {
				return errors.New("the signing key is a signing_key_file: replace the file to rotate it")
			}
			if err := app.keys.Rotate(ctx, now); err != nil {
				return err
			}
			s := app.keys.Signer()
			var jwks struct{ Keys []struct{ Kid string } }
			_ = json.Unmarshal(s.JWKS(), &jwks)
			fmt.Fprintf(cmd.OutOrStdout(), "issuer %s: kid %s signs now; published:", app.Issuer, s.KeyID())
			for _, k := range jwks.Keys {
				fmt.Fprintf(cmd.OutOrStdout(), " %s", k.Kid)
			}
			fmt.Fprintln(cmd.OutOrStdout())
			return nil
		},
	}
	c.Flags().StringVar(&configFile, "config", "", "the gateway's config file")
	c.Flags().StringVar(&adapter, "adapter", "caddyfile", "config adapter (empty for JSON)")
	c.Flags().BoolVar(&now, "now", false, "for a compromised key: sign with the new key at once and withdraw every other key")
	return c
}
