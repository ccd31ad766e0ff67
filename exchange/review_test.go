package exchange

import (
	"context"
	"encoding/json"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"
)

// Regression tests of the second security review (issue 10), each failing
// on the code before its fix.

// reviewEngine is an engine trusting two IdPs; idp-a also issues ID tokens
// to the clients web-app and other-app.
func reviewEngine(t *testing.T) (*Engine, *tokenIssuer, *tokenIssuer) {
	t.Helper()
	a := newTestIssuer(t, "https://idp-a.test")
	a.AddKey("a1", "ES256")
	b := newTestIssuer(t, "https://idp-b.test")
	b.AddKey("b1", "ES256")
	ca := issuerConfig(a, "ES256")
	ca.TokenTypes = []string{"access_token", "jwt", "id_token"}
	ca.ClientIDs = []string{"web-app", "other-app"}
	ts := newTestTrust(t, ca, issuerConfig(b, "ES256"))
	key, err := GenerateSigningKey("ES256")
	if err != nil {
		t.Fatal(err)
	}
	signer, err := NewSigner(key, "ES256")
	if err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(EngineConfig{Issuer: "https://gateway.test"}, ts, signer)
	if err != nil {
		t.Fatal(err)
	}
	return e, &tokenIssuer{a, "a1"}, &tokenIssuer{b, "b1"}
}

type tokenIssuer struct {
	idp interface {
		Token(kid string, c claims) string
	}
	kid string
}

func (ti *tokenIssuer) token(c claims) string { return ti.idp.Token(ti.kid, c) }

func client(id string) *AuthenticatedClient {
	return &AuthenticatedClient{ClientID: id, Method: ClientAuthSecretBasic, Config: ClientConfig{
		ClientID: id, Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read"}}}
}

func exchangeReq(subject, subjectType string, kv ...string) *TokenRequest {
	r := &TokenRequest{GrantType: GrantTypeTokenExchange, SubjectToken: subject, SubjectTokenType: subjectType, RequestedTokenType: TokenTypeAccessToken}
	for i := 0; i+1 < len(kv); i += 2 {
		switch kv[i] {
		case "actor_token":
			r.ActorToken = kv[i+1]
		case "actor_token_type":
			r.ActorTokenType = kv[i+1]
		}
	}
	return r
}

// TestMayActWithoutIssIsPerIssuer: sub values are unique only per issuer, so
// may_act {"sub": "bob"} names idp-a's bob, never idp-b's.
func TestMayActWithoutIssIsPerIssuer(t *testing.T) {
	e, a, b := reviewEngine(t)
	ctx := context.Background()
	subject := a.token(claims{"scope": "orders.read", "may_act": map[string]any{"sub": "bob"}})
	_, err := e.TokenExchange(ctx, exchangeReq(subject, TokenTypeAccessToken, "actor_token", b.token(claims{"sub": "bob"}), "actor_token_type", TokenTypeAccessToken), client("svc"))
	if e := AsError(err); e.Kind != KindInvalidRequest || e.Reason != "may_act" {
		t.Fatalf("actor bob of another issuer: %v, want invalid_request may_act", err)
	}
	if _, err := e.TokenExchange(ctx, exchangeReq(subject, TokenTypeAccessToken, "actor_token", a.token(claims{"sub": "bob"}), "actor_token_type", TokenTypeAccessToken), client("svc")); err != nil {
		t.Fatalf("actor bob of the subject's issuer: %v", err)
	}
	// An explicit iss names the other issuer's bob.
	subject = a.token(claims{"scope": "orders.read", "may_act": map[string]any{"sub": "bob", "iss": "https://idp-b.test"}})
	if _, err := e.TokenExchange(ctx, exchangeReq(subject, TokenTypeAccessToken, "actor_token", b.token(claims{"sub": "bob"}), "actor_token_type", TokenTypeAccessToken), client("svc")); err != nil {
		t.Fatalf("may_act with iss of the actor token: %v", err)
	}
	// The authenticated client is matched by its configured client_id.
	subject = a.token(claims{"scope": "orders.read", "may_act": map[string]any{"client_id": "svc"}})
	if _, err := e.TokenExchange(ctx, exchangeReq(subject, TokenTypeAccessToken), client("svc")); err != nil {
		t.Fatalf("may_act naming the client: %v", err)
	}
}

// TestIDTokenOnlyForItsClient: an ID token is exchanged only by the client
// it was issued to (aud/azp), not by any client the issuer lists.
func TestIDTokenOnlyForItsClient(t *testing.T) {
	e, a, _ := reviewEngine(t)
	ctx := context.Background()
	idToken := a.token(claims{"aud": "web-app", "nonce": "n", "scope": "orders.read"})
	if _, err := e.TokenExchange(ctx, exchangeReq(idToken, TokenTypeIDToken), client("other-app")); AsError(err).Reason != "id_token_client" {
		t.Fatalf("other-app exchanged web-app's ID token: %v", err)
	}
	if _, err := e.TokenExchange(ctx, exchangeReq(idToken, TokenTypeIDToken), client("web-app")); err != nil {
		t.Fatalf("web-app with its own ID token: %v", err)
	}
	withAzp := a.token(claims{"aud": []any{"web-app", "other-app"}, "azp": "web-app"})
	if _, err := e.TokenExchange(ctx, exchangeReq(withAzp, TokenTypeIDToken), client("other-app")); AsError(err).Reason != "id_token_client" {
		t.Fatalf("azp web-app, exchanged by other-app: %v", err)
	}
}

// TestActorTokenKeepsTheClientVisible: with an actor token the minted act
// names the actor token's subject; the authenticated client stays in the
// minted token's client_id.
func TestActorTokenKeepsTheClientVisible(t *testing.T) {
	e, a, _ := reviewEngine(t)
	issued, err := e.TokenExchange(context.Background(), exchangeReq(a.token(claims{"scope": "orders.read", "client_id": "spa"}), TokenTypeAccessToken,
		"actor_token", a.token(claims{"sub": "bob"}), "actor_token_type", TokenTypeAccessToken), client("svc"))
	if err != nil {
		t.Fatal(err)
	}
	c, _ := parseMinted(t, e.Signer(), issued.AccessToken)
	if c["client_id"] != "svc" {
		t.Errorf("client_id = %v, want the authenticated client svc", c["client_id"])
	}
	if act, _ := c["act"].(map[string]any); act["sub"] != "bob" {
		t.Errorf("act = %v, want the actor token's subject", c["act"])
	}
}

// TestScpIsNotCopyable: scp is a scope claim; copying it would carry the
// subject's unnarrowed scopes past down-scoping.
func TestScpIsNotCopyable(t *testing.T) {
	g := &Grant{Audiences: []string{"x"}, Claims: []string{"scp"}}
	if err := g.Validate(); err == nil {
		t.Fatal("claims scp accepted")
	}
}

// TestStrictJSONDepthCap: nesting is refused before the checker's stack (or
// json.Unmarshal's recursion) grows with it.
func TestStrictJSONDepthCap(t *testing.T) {
	ok := strings.Repeat(`{"a":`, maxJSONDepth-1) + "1" + strings.Repeat("}", maxJSONDepth-1)
	if err := checkStrictJSON([]byte(ok)); err != nil {
		t.Fatalf("depth %d: %v", maxJSONDepth-1, err)
	}
	for _, deep := range []string{
		strings.Repeat(`{"a":`, maxJSONDepth+1) + "1" + strings.Repeat("}", maxJSONDepth+1),
		strings.Repeat("[", 100000) + strings.Repeat("]", 100000),
	} {
		if err := checkStrictJSON([]byte(deep)); err == nil || !strings.Contains(err.Error(), "deeper") {
			t.Fatalf("deep JSON: %v", err)
		}
	}
	allocs := testing.AllocsPerRun(10, func() { _ = checkStrictJSON([]byte(strings.Repeat("[", 1<<16))) })
	if allocs > 8 {
		t.Errorf("refusing deep JSON allocated %v times", allocs)
	}
}

// TestPolicyDenialDoesNotDiscloseTheRule: the caller learns that policy
// denied it; the rule text goes to the log only (Err).
func TestPolicyDenialDoesNotDiscloseTheRule(t *testing.T) {
	e, a, _ := reviewEngine(t)
	rules, err := CompileRules(RuleConfig{DenyIf: []string{"subject.sub == 'mallory'"}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.ExchangeBearer(context.Background(), a.token(claims{"sub": "mallory", "exp": time.Now().Add(time.Minute).Unix()}), &Grant{Audiences: []string{"x"}, Rules: rules}, nil)
	x := AsError(err)
	if x.Kind != KindDenied || strings.Contains(x.Description, "mallory") || x.Description != "denied by policy" {
		t.Fatalf("description %q", x.Description)
	}
	if x.Err == nil || !strings.Contains(x.Err.Error(), "subject.sub == 'mallory'") {
		t.Fatalf("the rule is not in the logged cause: %v", x.Err)
	}
}

// TestPublishedJWKSHasOnlyPublicMembers: a signing key file may carry other
// members (x5c, a note, even a stray secret); the JWKS gets the public key
// material and kid, alg, use only.
func TestPublishedJWKSHasOnlyPublicMembers(t *testing.T) {
	key, err := GenerateSigningKey("ES256")
	if err != nil {
		t.Fatal(err)
	}
	for name, v := range map[string]any{"kid": "k1", "x-secret": "hunter2", "key_ops": []any{"sign"}} {
		if err := key.Set(name, v); err != nil {
			t.Fatal(err)
		}
	}
	s, err := NewSigner(key, "ES256")
	if err != nil {
		t.Fatal(err)
	}
	var doc struct{ Keys []map[string]any }
	if err := json.Unmarshal(s.JWKS(), &doc); err != nil || len(doc.Keys) != 1 {
		t.Fatalf("JWKS %s: %v", s.JWKS(), err)
	}
	got := slices.Sorted(maps.Keys(doc.Keys[0]))
	if want := []string{"alg", "crv", "kid", "kty", "use", "x", "y"}; !slices.Equal(got, want) {
		t.Fatalf("published members %v, want %v", got, want)
	}
	if doc.Keys[0]["kid"] != "k1" {
		t.Errorf("kid %v", doc.Keys[0]["kid"])
	}
}
