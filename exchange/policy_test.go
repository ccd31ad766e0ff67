package exchange

import (
	"context"
	"testing"
)

// Policy through the engine: rules decide, grants expand, the grant's scope
// still caps, computed claims land in the minted token.
func TestExchangeWithRules(t *testing.T) {
	f := newEngineFixture(t, "ES256")
	rules, err := CompileRules(RuleConfig{
		DenyIf:  []string{`subject.sub == 'mallory'`},
		AllowIf: []string{`has(subject.email)`},
		Grants: []GrantRule{
			{Scopes: []string{"write:documents"}, If: `'admin' in subject.groups`},
			{Scopes: []string{"admin:everything"}, If: `true`}, // outside the route's scope: must never appear
		},
		Claims: []ClaimRule{{Name: "tenant", Expr: `subject.email.split('@')[1]`}},
	})
	if err != nil {
		t.Fatal(err)
	}
	grant := &Grant{Audiences: []string{"https://docs.internal"}, Scopes: []string{"read:documents", "write:documents"}, Rules: rules}
	ctx := context.Background()
	exchange := func(c claims) (*Minted, error) {
		return f.engine.ExchangeBearer(ctx, f.idp.Token(f.kid, c), grant, &RequestInfo{Method: "GET", Path: "/"})
	}

	admin, err := exchange(claims{"email": "ann@acme.test", "groups": []string{"admin"}, "scope": "read:documents"})
	if err != nil {
		t.Fatal(err)
	}
	if got := FormatScope(admin.Scopes); got != "read:documents write:documents" {
		t.Fatalf("admin scopes = %q", got)
	}
	c, _ := parseMinted(t, f.signer, admin.Token)
	if c["tenant"] != "acme.test" {
		t.Fatalf("tenant claim = %#v", c["tenant"])
	}
	if c["scope"] != "read:documents write:documents" {
		t.Fatalf("minted scope %v widened or lost", c["scope"])
	}

	user, err := exchange(claims{"email": "bob@acme.test", "groups": []string{"staff"}, "scope": "read:documents"})
	if err != nil {
		t.Fatal(err)
	}
	if got := FormatScope(user.Scopes); got != "read:documents" {
		t.Fatalf("non-admin scopes = %q", got)
	}

	for name, c := range map[string]claims{
		"deny_if holds":    {"sub": "mallory", "email": "m@acme.test"},
		"allow_if fails":   {"scope": "read:documents"},
		"evaluation error": {"email": 42}, // has(email) true, split fails only in the claim; allow passes
	} {
		_, err := exchange(c)
		if name == "evaluation error" {
			// a failing claim expression omits the claim, it does not deny
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			continue
		}
		if e := AsError(err); e.Kind != KindDenied || e.Reason != "policy" {
			t.Fatalf("%s: err = %v, want a policy denial", name, err)
		}
	}
}

func TestCompileRulesRefusesRegisteredClaim(t *testing.T) {
	for _, name := range []string{"sub", "act", "scope", "aud", "may_act", "cnf"} {
		if _, err := CompileRules(RuleConfig{Claims: []ClaimRule{{Name: name, Expr: `'x'`}}}); err == nil {
			t.Errorf("claim %s accepted", name)
		}
	}
}
