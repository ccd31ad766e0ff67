package exchange

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
)

// TestExplainMiddleware: the trace of a success names the trust block, the
// key, each check, the scopes kept and dropped, the rules and the minted
// claims; each refusal names the failing check; no trace holds the token.
func TestExplainMiddleware(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	rules, err := CompileRules(RuleConfig{
		DenyIf: []string{"subject.sub == 'mallory'"},
		Grants: []GrantRule{{Scopes: []string{"orders.write"}, If: "'admin' in subject.groups"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	grant, err := NewGrant(Grant{Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read", "orders.write"},
		RequireScopes: []string{"orders.read"}, Claims: []string{"email"}, Rules: rules})
	if err != nil {
		t.Fatal(err)
	}
	ok := f.idp.Token(f.kid, claims{"scope": "orders.read profile", "groups": []string{"admin"}, "email": "a@example.com"})
	tr, m, err := f.engine.Explain(context.Background(), ok, nil, grant, nil)
	if err != nil || m == nil {
		t.Fatalf("explain refused a good token: %v", err)
	}
	js, _ := json.Marshal(tr)
	for _, want := range []string{`"issuer":"https://idp.test"`, `"check":"key and signature"`, `"scope":"orders.write","kept":true,"why":"granted by a rule`,
		`"scope":"profile","kept":false`, `"email":"a@example.com"`, `"act":{"sub":"https://gateway.test"}`, `"value":true`, HashToken(ok)} {
		if !strings.Contains(string(js), want) {
			t.Errorf("trace lacks %s:\n%s", want, js)
		}
	}
	if strings.Contains(string(js), ok) || tr.Refusal != nil {
		t.Fatalf("trace holds the token or a refusal: %s", js)
	}

	cases := []struct {
		name, token, check, code string
	}{
		{"garbage", "not.a.token", "format", "invalid_token"},
		{"expired", f.idp.Token(f.kid, claims{"exp": 1}), "times", "invalid_token"},
		{"wrong audience", f.idp.Token(f.kid, claims{"aud": "https://other"}), "audience", "invalid_token"},
		{"untrusted issuer", f.idp.Token(f.kid, claims{"iss": "https://idp.test/"}), "issuer", "invalid_token"},
		{"no scope", f.idp.Token(f.kid, claims{"scope": "profile"}), "required scopes", "insufficient_scope"},
		{"denied by rule", f.idp.Token(f.kid, claims{"sub": "mallory", "scope": "orders.read"}), "policy rules", "insufficient_scope"},
		{"missing token", "", "bearer token", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tr, _, err := f.engine.Explain(context.Background(), tc.token, nil, grant, nil)
			if err == nil || tr.Refusal == nil {
				t.Fatal("not refused")
			}
			if tr.Refusal.Check != tc.check || tr.Refusal.Error != tc.code {
				t.Fatalf("refusal %+v, want check %q code %q", tr.Refusal, tc.check, tc.code)
			}
			last := tr.Steps[len(tr.Steps)-1]
			if last.OK || last.Check != tc.check {
				t.Fatalf("last step %+v", last)
			}
			for _, s := range tr.Steps[:len(tr.Steps)-1] {
				if !s.OK {
					t.Fatalf("a step before the refusal failed: %+v", s)
				}
			}
			if tc.name == "untrusted issuer" && !strings.Contains(last.Detail, "did you mean") {
				t.Fatalf("no typo hint: %s", last.Detail)
			}
		})
	}
}
