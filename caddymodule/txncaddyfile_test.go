package caddymodule

import (
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// Caddyfile errors of txn_token and txn_token_verify name their line.
func TestTxnCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct{ input, want string }{
		{"token_exchange https://orders.internal {\n txn_token {\n lifetime 60s\n }\n}", "trust domain"},
		{"token_exchange https://orders.internal {\n txn_token https://t {\n lifetime 1h\n }\n}", "Testfile:3"},
		{"token_exchange https://orders.internal {\n txn_token https://t {\n subject maybe\n }\n}", "Testfile:3"},
		{"token_exchange https://orders.internal {\n txn_token https://t {\n tctx bad subject.(\n }\n}", "Testfile:3"},
	} {
		err := new(Handler).UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want it to mention %q", tc.input, err, tc.want)
		}
	}
	for _, tc := range []struct{ input, want string }{
		{"txn_token_verify {\n trust_domain https://t\n}", "jwks_url and trust_domain"},
		{"txn_token_verify {\n jwks_url ftp://x\n}", "Testfile:2"},
		{"txn_token_verify {\n algorithms HS256\n}", "Testfile:2"},
	} {
		err := new(TxnVerifyHandler).UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want it to mention %q", tc.input, err, tc.want)
		}
	}
	h := new(Handler)
	if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("token_exchange https://o {\n txn_token https://t {\n tctx who `subject.sub + \"!\"`\n authorization none\n }\n}")); err != nil {
		t.Fatal(err)
	}
	if h.TxnToken == nil || h.TxnToken.Audience != "https://t" || h.TxnToken.Authorization != "none" || len(h.TxnToken.Tctx) != 1 {
		t.Fatalf("parsed %+v", h.TxnToken)
	}
}
