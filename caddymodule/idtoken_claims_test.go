package caddymodule

import (
	"net/http"
	"strings"
	"testing"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// Issue 13 item 5: Keycloak 24 and older put nonce into access tokens. ID
// token detection is per trust block: the default refuses a token with
// nonce, at_hash or c_hash as an access token; `id_token_claims at_hash
// c_hash` accepts Keycloak's access tokens and still refuses real ID tokens;
// `id_token_claims none` turns detection off.
func TestIDTokenClaimsPerTrustBlock(t *testing.T) {
	const route = `token_exchange {
			audience https://orders.internal
			scope orders.read
		}`
	type want map[string]int
	cases := []struct {
		name, trust string
		want        want
	}{
		{"default", "", want{"nonce": 401, "at_hash": 401, "c_hash": 401, "plain": 200}},
		{"keycloak", "id_token_claims at_hash c_hash", want{"nonce": 200, "at_hash": 401, "c_hash": 401, "plain": 200}},
		{"none", "id_token_claims none", want{"nonce": 200, "at_hash": 200, "c_hash": 200, "plain": 200}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := startGatewayWithTrust(t, tc.trust, route)
			for claim, status := range tc.want {
				c := testidp.Claims{"scope": "orders.read"}
				if claim != "plain" {
					c[claim] = "n-0S6_WzA2Mj"
				}
				resp := g.get(t, "/api/orders", map[string]string{"Authorization": "Bearer " + g.idp.Token("ec-1", c)})
				if resp.StatusCode != status {
					t.Errorf("token with %s: status %d, want %d", claim, resp.StatusCode, status)
				}
				if status == 401 && !strings.Contains(resp.Header.Get("WWW-Authenticate"), "an ID token is not an access token") {
					t.Errorf("token with %s: challenge %q", claim, resp.Header.Get("WWW-Authenticate"))
				}
			}
			// refresh tokens are refused whatever the detection says
			resp := g.get(t, "/api/orders", map[string]string{"Authorization": "Bearer " +
				g.idp.Token("ec-1", testidp.Claims{"scope": "orders.read", "typ": "Refresh"})})
			if resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("refresh token: status %d", resp.StatusCode)
			}
		})
	}
}
