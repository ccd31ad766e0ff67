package exchange

import (
	"encoding/json"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
)

func mustCompileRules(t testing.TB, cfg RuleConfig) *Rules {
	t.Helper()
	r, err := CompileRules(cfg)
	if err != nil {
		t.Fatalf("CompileRules: %v", err)
	}
	return r
}

func mustEvaluate(t testing.TB, r *Rules, in RuleInput) *RuleResult {
	t.Helper()
	res, err := r.Evaluate(in)
	if err != nil {
		t.Fatalf("Evaluate: %v", err)
	}
	if res == nil {
		t.Fatal("Evaluate returned a nil result")
	}
	return res
}

func ruleSubject() map[string]any {
	return map[string]any{
		"sub":    "alice",
		"email":  "alice@example.com",
		"groups": []any{"dev", "admin"},
		"level":  float64(3), // JSON numbers decode as float64
		"tenant": "acme",
		"profile": map[string]any{
			"dept": "eng",
			"tags": []any{"a", "b"},
		},
	}
}

func TestRulesCompileErrors(t *testing.T) {
	tests := []struct {
		name string
		cfg  RuleConfig
		want []string // substrings of the error
	}{
		{"syntax", RuleConfig{AllowIf: []string{"subject.sub =="}}, []string{`allow_if "subject.sub =="`, "Syntax error"}},
		{"syntax in claim", RuleConfig{Claims: []ClaimRule{{Name: "x", Expr: "subject.("}}}, []string{`claim x "subject.("`}},
		{"non-bool allow_if", RuleConfig{AllowIf: []string{"1 + 2"}}, []string{`allow_if "1 + 2"`, "bool", "int"}},
		{"non-bool deny_if", RuleConfig{DenyIf: []string{"'yes'"}}, []string{`deny_if "'yes'"`, "string"}},
		{"non-bool grant", RuleConfig{Grants: []GrantRule{{Scopes: []string{"a"}, If: "size(subject)"}}}, []string{`grant a if "size(subject)"`, "int"}},
		{"unknown variable", RuleConfig{DenyIf: []string{"user.sub == 'x'"}}, []string{`deny_if "user.sub == 'x'"`, "undeclared reference", "user"}},
		{"unknown function", RuleConfig{AllowIf: []string{"readFile('/etc/passwd') == ''"}}, []string{"readFile"}},
		{"type error", RuleConfig{AllowIf: []string{"subject + 1 == 2"}}, []string{`allow_if "subject + 1 == 2"`, "no matching overload"}},
		{"backticks are no CEL string", RuleConfig{AllowIf: []string{"subject.sub == `alice`"}}, []string{"Syntax error"}},
		{"empty expression", RuleConfig{AllowIf: []string{"  "}}, []string{"allow_if", "empty expression"}},
		{"registered claim sub", RuleConfig{Claims: []ClaimRule{{Name: "sub", Expr: "'x'"}}}, []string{`claim "sub"`, "set by the engine"}},
		{"registered claim act", RuleConfig{Claims: []ClaimRule{{Name: "act", Expr: "actor"}}}, []string{`claim "act"`}},
		{"registered claim scope", RuleConfig{Claims: []ClaimRule{{Name: "scope", Expr: "'admin'"}}}, []string{`claim "scope"`}},
		{"duplicate claim", RuleConfig{Claims: []ClaimRule{{Name: "t", Expr: "'a'"}, {Name: "t", Expr: "'b'"}}}, []string{`claim "t"`, "twice"}},
		{"empty claim name", RuleConfig{Claims: []ClaimRule{{Name: "", Expr: "'a'"}}}, []string{"empty claim name"}},
		{"grant without scope", RuleConfig{Grants: []GrantRule{{If: "true"}}}, []string{"no scope"}},
		{"grant bad scope token", RuleConfig{Grants: []GrantRule{{Scopes: []string{`a"b`}, If: "true"}}}, []string{"scope token"}},
		{"later rule bad", RuleConfig{AllowIf: []string{"true", "subject.sub == "}}, []string{`allow_if "subject.sub == "`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := CompileRules(tt.cfg)
			if err == nil {
				t.Fatalf("CompileRules succeeded (%v), want an error", r)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestRulesCompileAcceptsDynAndDocumentedExamples(t *testing.T) {
	cfg := RuleConfig{
		AllowIf: []string{
			"'admin' in subject.groups",
			"subject.email.endsWith('@example.com')",
			"has(subject.tenant)",
			"subject.sub", // dyn: checked when evaluated
			"request == null || request.method == \"GET\"",
			"actor == null",
			"client == 'svc'",
			"'orders.read' in route.scopes",
		},
		Grants: []GrantRule{{Scopes: []string{"admin:all"}, If: "subject.admin"}},
		Claims: []ClaimRule{
			{Name: "tenant", Expr: "subject.email.split('@')[1]"},
			{Name: "nick", Expr: "subject.?nick.orValue('none')"},
		},
	}
	r := mustCompileRules(t, cfg)
	if r.Empty() {
		t.Fatal("Empty() = true for a config with rules")
	}
}

func TestRulesEmpty(t *testing.T) {
	var nilRules *Rules
	if !nilRules.Empty() {
		t.Error("nil Rules is not Empty")
	}
	res := mustEvaluate(t, nilRules, RuleInput{})
	if res.Denied || res.Granted != nil || res.Claims != nil {
		t.Errorf("nil Rules evaluated to %+v", res)
	}
	r := mustCompileRules(t, RuleConfig{})
	if !r.Empty() {
		t.Error("Rules of an empty config is not Empty")
	}
	for _, cfg := range []RuleConfig{
		{AllowIf: []string{"true"}},
		{DenyIf: []string{"false"}},
		{Grants: []GrantRule{{Scopes: []string{"a"}, If: "true"}}},
		{Claims: []ClaimRule{{Name: "x", Expr: "1"}}},
	} {
		if mustCompileRules(t, cfg).Empty() {
			t.Errorf("Empty() = true for %+v", cfg)
		}
	}
}

func TestRulesAllowDeny(t *testing.T) {
	sub := ruleSubject()
	req := &RequestInfo{
		Method:   "GET",
		Host:     "api.example.com",
		Path:     "/orders/7",
		RemoteIP: "10.1.2.3",
		Headers:  map[string][]string{"X-Tenant": {"acme", "other"}, "Accept": {"application/json"}},
	}
	route := RouteInfo{Audiences: []string{"https://orders.internal"}, Scopes: []string{"orders.read", "orders.write"}}
	base := RuleInput{Subject: sub, Request: req, Route: route}
	with := func(f func(*RuleInput)) RuleInput {
		in := base
		f(&in)
		return in
	}

	tests := []struct {
		name       string
		allow      []string
		deny       []string
		in         RuleInput
		wantDenied bool
		wantReason string
		wantErr    string // substring of Errors; "" means Errors must be empty
	}{
		{name: "allow true", allow: []string{"subject.sub == 'alice'"}, in: base},
		{name: "allow false", allow: []string{"subject.sub == 'bob'"}, in: base,
			wantDenied: true, wantReason: `allow_if "subject.sub == 'bob'"`},
		{name: "allow AND: all true", allow: []string{"'admin' in subject.groups", "subject.email.endsWith('@example.com')"}, in: base},
		{name: "allow AND: one false denies", allow: []string{"'admin' in subject.groups", "subject.email.endsWith('@corp.example')", "true"}, in: base,
			wantDenied: true, wantReason: `allow_if "subject.email.endsWith('@corp.example')"`},
		{name: "allow group missing", allow: []string{"'root' in subject.groups"}, in: base,
			wantDenied: true, wantReason: `allow_if "'root' in subject.groups"`},
		{name: "deny true", deny: []string{"subject.sub == 'alice'"}, in: base,
			wantDenied: true, wantReason: `deny_if "subject.sub == 'alice'"`},
		{name: "deny false", deny: []string{"subject.sub == 'bob'"}, in: base},
		{name: "deny OR: none true", deny: []string{"subject.sub == 'bob'", "'root' in subject.groups"}, in: base},
		{name: "deny OR: second true denies", deny: []string{"subject.sub == 'bob'", "'dev' in subject.groups"}, in: base,
			wantDenied: true, wantReason: `deny_if "'dev' in subject.groups"`},
		{name: "allow passes but deny denies", allow: []string{"true"}, deny: []string{"subject.tenant == 'acme'"}, in: base,
			wantDenied: true, wantReason: `deny_if "subject.tenant == 'acme'"`},
		{name: "has present", allow: []string{"has(subject.tenant)"}, in: base},
		{name: "has absent", allow: []string{"has(subject.nick)"}, in: base,
			wantDenied: true, wantReason: `allow_if "has(subject.nick)"`},
		{name: "json number equals int literal", allow: []string{"subject.level == 3", "subject.level > 2", "subject.level < 3.5"}, in: base},
		{name: "nested map", allow: []string{"subject.profile.dept == 'eng'", "'b' in subject.profile.tags"}, in: base},
		// What a Caddyfile `backtick-quoted` token delivers: double quotes intact.
		{name: "double-quoted literal", allow: []string{`subject.sub == "alice"`}, in: base},

		// Fail closed.
		{name: "allow eval error denies", allow: []string{"subject.missing == 'x'"}, in: base,
			wantDenied: true, wantReason: `allow_if "subject.missing == 'x'"`, wantErr: "no such key"},
		{name: "deny eval error denies", deny: []string{"subject.missing == 'x'"}, in: base,
			wantDenied: true, wantReason: `deny_if "subject.missing == 'x'"`, wantErr: "no such key"},
		{name: "allow dyn non-bool denies", allow: []string{"subject.sub"}, in: base,
			wantDenied: true, wantReason: `allow_if "subject.sub"`, wantErr: "not a bool"},
		{name: "deny dyn non-bool denies", deny: []string{"subject.level"}, in: base,
			wantDenied: true, wantReason: `deny_if "subject.level"`, wantErr: "not a bool"},
		{name: "type mismatch at run time denies", allow: []string{"subject.groups.startsWith('a')"}, in: base,
			wantDenied: true, wantReason: `allow_if "subject.groups.startsWith('a')"`, wantErr: "evaluation error"},
		{name: "nil subject is an empty map", allow: []string{"!has(subject.sub)", "size(subject) == 0"}, in: RuleInput{}},
		{name: "nil subject fails closed", allow: []string{"subject.sub == 'alice'"}, in: RuleInput{},
			wantDenied: true, wantReason: `allow_if "subject.sub == 'alice'"`, wantErr: "no such key"},

		// actor and client: null when absent.
		{name: "actor null", allow: []string{"actor == null"}, in: base},
		{name: "actor present", allow: []string{"actor != null", "actor.sub == 'svc-a'"},
			in: with(func(in *RuleInput) { in.Actor = map[string]any{"sub": "svc-a"} })},
		{name: "actor present is not null", allow: []string{"actor == null"},
			in:         with(func(in *RuleInput) { in.Actor = map[string]any{"sub": "svc-a"} }),
			wantDenied: true, wantReason: `allow_if "actor == null"`},
		{name: "actor field on null fails closed", allow: []string{"actor.sub == 'svc-a'"}, in: base,
			wantDenied: true, wantReason: `allow_if "actor.sub == 'svc-a'"`, wantErr: "evaluation error"},
		{name: "null-safe actor check", deny: []string{"actor != null && actor.sub == 'evil'"}, in: base},
		{name: "client null", allow: []string{"client == null"}, in: base},
		{name: "client null is not svc", allow: []string{"client == 'svc'"}, in: base,
			wantDenied: true, wantReason: `allow_if "client == 'svc'"`},
		{name: "client svc", allow: []string{"client == 'svc'"}, in: with(func(in *RuleInput) { in.Client = "svc" })},
		{name: "client other", allow: []string{"client == 'svc'"}, in: with(func(in *RuleInput) { in.Client = "billing" }),
			wantDenied: true, wantReason: `allow_if "client == 'svc'"`},

		// request.
		{name: "request method", allow: []string{"request.method == 'GET'"}, in: base},
		{name: "request method mismatch", allow: []string{"request.method == 'POST'"}, in: base,
			wantDenied: true, wantReason: `allow_if "request.method == 'POST'"`},
		{name: "request host path ip", allow: []string{
			"request.host == 'api.example.com'",
			"request.path.startsWith('/orders/')",
			"request.remote_ip.startsWith('10.')",
		}, in: base},
		{name: "request headers lower-cased, all values", allow: []string{
			"request.headers['x-tenant'] == ['acme', 'other']",
			"'accept' in request.headers",
			"!('X-Tenant' in request.headers)",
		}, in: base},
		{name: "request null on the endpoint", allow: []string{"request == null"}, in: with(func(in *RuleInput) { in.Request = nil })},
		{name: "request field on null fails closed", allow: []string{"request.method == 'GET'"}, in: with(func(in *RuleInput) { in.Request = nil }),
			wantDenied: true, wantReason: `allow_if "request.method == 'GET'"`, wantErr: "evaluation error"},
		{name: "request without headers", allow: []string{"size(request.headers) == 0"},
			in: with(func(in *RuleInput) { in.Request = &RequestInfo{Method: "GET"} })},

		// route.
		{name: "route", allow: []string{"'orders.read' in route.scopes", "route.audiences == ['https://orders.internal']"}, in: base},
		{name: "route empty lists", allow: []string{"size(route.scopes) == 0", "size(route.audiences) == 0"},
			in: with(func(in *RuleInput) { in.Route = RouteInfo{} })},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := mustCompileRules(t, RuleConfig{AllowIf: tt.allow, DenyIf: tt.deny})
			res := mustEvaluate(t, r, tt.in)
			if res.Denied != tt.wantDenied {
				t.Fatalf("Denied = %v, want %v (reason %q, errors %q)", res.Denied, tt.wantDenied, res.Reason, res.Errors)
			}
			if res.Reason != tt.wantReason {
				t.Errorf("Reason = %q, want %q", res.Reason, tt.wantReason)
			}
			switch {
			case tt.wantErr == "" && len(res.Errors) != 0:
				t.Errorf("Errors = %q, want none", res.Errors)
			case tt.wantErr != "" && (len(res.Errors) != 1 || !strings.Contains(res.Errors[0], tt.wantErr) || !strings.HasPrefix(res.Errors[0], tt.wantReason)):
				t.Errorf("Errors = %q, want one error naming %s and containing %q", res.Errors, tt.wantReason, tt.wantErr)
			}
		})
	}
}

func TestRulesDenialStopsGrantsAndClaims(t *testing.T) {
	r := mustCompileRules(t, RuleConfig{
		DenyIf: []string{"subject.sub == 'alice'"},
		Grants: []GrantRule{{Scopes: []string{"orders.write"}, If: "true"}},
		Claims: []ClaimRule{{Name: "tenant", Expr: "'acme'"}},
	})
	res := mustEvaluate(t, r, RuleInput{Subject: ruleSubject()})
	if !res.Denied || res.Granted != nil || res.Claims != nil {
		t.Errorf("denied result carries grants or claims: %+v", res)
	}
}

func TestRulesCostLimitFailsClosed(t *testing.T) {
	groups := make([]any, 2000)
	for i := range groups {
		groups[i] = fmt.Sprintf("group-%d", i)
	}
	sub := map[string]any{"sub": "alice", "groups": groups}
	expr := "subject.groups.exists(g, g.endsWith('-admin'))"

	limited := mustCompileRules(t, RuleConfig{DenyIf: []string{expr}, CostLimit: 100})
	res := mustEvaluate(t, limited, RuleInput{Subject: sub})
	if !res.Denied || len(res.Errors) != 1 || !strings.Contains(res.Errors[0], "cost limit") {
		t.Fatalf("over the cost limit: Denied=%v Errors=%q, want denied by the cost limit", res.Denied, res.Errors)
	}
	// The default limit admits the same work.
	def := mustCompileRules(t, RuleConfig{DenyIf: []string{expr}})
	if res := mustEvaluate(t, def, RuleInput{Subject: sub}); res.Denied {
		t.Fatalf("default cost limit denied: %q %q", res.Reason, res.Errors)
	}
}

func TestRulesGrants(t *testing.T) {
	grants := []GrantRule{
		{Scopes: []string{"admin:all", "orders.write"}, If: "'admin' in subject.groups"},
		{Scopes: []string{"orders.write", "orders.read"}, If: "subject.email.endsWith('@example.com')"},
		{Scopes: []string{"reports.read"}, If: "has(subject.tenant) && subject.tenant == 'acme'"},
	}
	tests := []struct {
		name    string
		grants  []GrantRule
		subject map[string]any
		want    []string
		wantErr string // substring of the only expected error
	}{
		{name: "admin and example.com", grants: grants, subject: ruleSubject(),
			want: []string{"admin:all", "orders.write", "orders.read", "reports.read"}},
		{name: "not admin", grants: grants,
			subject: map[string]any{"groups": []any{"dev"}, "email": "bob@example.com"},
			want:    []string{"orders.write", "orders.read"}},
		{name: "nothing holds", grants: grants,
			subject: map[string]any{"groups": []any{}, "email": "eve@evil.test", "tenant": "x"}},
		{name: "condition error: not given, others still evaluated", grants: grants,
			subject: map[string]any{"email": "bob@example.com"}, // no groups
			want:    []string{"orders.write", "orders.read"}, wantErr: `grant admin:all orders.write if "'admin' in subject.groups"`},
		{name: "non-bool at run time: not given",
			grants:  []GrantRule{{Scopes: []string{"x"}, If: "subject.sub"}, {Scopes: []string{"y"}, If: "true"}},
			subject: ruleSubject(), want: []string{"y"}, wantErr: "not a bool"},
		{name: "false literal", grants: []GrantRule{{Scopes: []string{"x"}, If: "false"}}, subject: ruleSubject()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := mustCompileRules(t, RuleConfig{Grants: tt.grants})
			res := mustEvaluate(t, r, RuleInput{Subject: tt.subject})
			if res.Denied {
				t.Fatalf("grants alone denied: %q", res.Reason)
			}
			if !slices.Equal(res.Granted, tt.want) {
				t.Errorf("Granted = %q, want %q", res.Granted, tt.want)
			}
			switch {
			case tt.wantErr == "" && len(res.Errors) != 0:
				t.Errorf("Errors = %q, want none", res.Errors)
			case tt.wantErr != "" && (len(res.Errors) != 1 || !strings.Contains(res.Errors[0], tt.wantErr)):
				t.Errorf("Errors = %q, want one containing %q", res.Errors, tt.wantErr)
			}
		})
	}
}

func TestRulesGrantableScopes(t *testing.T) {
	r := mustCompileRules(t, RuleConfig{Grants: []GrantRule{
		{Scopes: []string{"a", "b"}, If: "true"},
		{Scopes: []string{"b", "c"}, If: "false"},
	}})
	if got, want := r.grantableScopes(), []string{"a", "b", "c"}; !slices.Equal(got, want) {
		t.Errorf("grantableScopes = %q, want %q", got, want)
	}
}

func TestNarrowScopes(t *testing.T) {
	tests := []struct {
		granted, ceiling, want []string
	}{
		{[]string{"a", "b"}, []string{"a", "b", "c"}, []string{"a", "b"}},
		{[]string{"b", "x", "a"}, []string{"a", "b"}, []string{"b", "a"}},
		{[]string{"a", "a", "b"}, []string{"a", "b"}, []string{"a", "b"}},
		{[]string{"a"}, nil, []string{}},
		{nil, []string{"a"}, []string{}},
		{[]string{"A"}, []string{"a"}, []string{}}, // scopes are case-sensitive
	}
	for _, tt := range tests {
		if got := narrowScopes(tt.granted, tt.ceiling); !slices.Equal(got, tt.want) {
			t.Errorf("narrowScopes(%q, %q) = %q, want %q", tt.granted, tt.ceiling, got, tt.want)
		}
	}

	// Exhaustively over small sets: the result is always within both.
	universe := []string{"a", "b", "c", "admin:all"}
	subset := func(mask int) []string {
		var s []string
		for i, u := range universe {
			if mask&(1<<i) != 0 {
				s = append(s, u)
			}
		}
		return s
	}
	for g := 0; g < 1<<len(universe); g++ {
		for c := 0; c < 1<<len(universe); c++ {
			granted, ceiling := subset(g), subset(c)
			got := narrowScopes(granted, ceiling)
			for _, s := range got {
				if !slices.Contains(ceiling, s) || !slices.Contains(granted, s) {
					t.Fatalf("narrowScopes(%q, %q) = %q holds %q", granted, ceiling, got, s)
				}
			}
			for _, s := range granted {
				if slices.Contains(ceiling, s) && !slices.Contains(got, s) {
					t.Fatalf("narrowScopes(%q, %q) = %q drops %q", granted, ceiling, got, s)
				}
			}
		}
	}
}

// A grant rule can name any scope, but what it grants passes through the
// ceiling: admin:all is never issued when the route does not delegate it.
func TestRulesGrantNeverWidensThroughNarrowScopes(t *testing.T) {
	r := mustCompileRules(t, RuleConfig{Grants: []GrantRule{
		{Scopes: []string{"admin:all", "orders.write"}, If: "'admin' in subject.groups"},
	}})
	ceiling := []string{"orders.read", "orders.write"}
	res := mustEvaluate(t, r, RuleInput{Subject: ruleSubject(), Route: RouteInfo{Scopes: ceiling}})
	if !slices.Contains(res.Granted, "admin:all") {
		t.Fatalf("the grant rule did not fire (Granted = %q): the test proves nothing", res.Granted)
	}
	got := narrowScopes(res.Granted, ceiling)
	if slices.Contains(got, "admin:all") {
		t.Fatalf("narrowScopes let admin:all through: %q", got)
	}
	if !slices.Equal(got, []string{"orders.write"}) {
		t.Errorf("narrowScopes = %q, want [orders.write]", got)
	}
	if got := narrowScopes(res.Granted, nil); len(got) != 0 {
		t.Errorf("narrowScopes with no ceiling = %q, want nothing", got)
	}
}

func TestRulesClaims(t *testing.T) {
	tests := []struct {
		name     string
		expr     string
		in       RuleInput
		want     any // nil: the claim must be absent
		wantJSON string
		wantErr  string
	}{
		{name: "tenant from email", expr: "subject.email.split('@')[1]", want: "example.com", wantJSON: `"example.com"`},
		{name: "lowerAscii", expr: "subject.sub.upperAscii()", want: "ALICE", wantJSON: `"ALICE"`},
		{name: "int", expr: "size(subject.groups)", want: int64(2), wantJSON: `2`},
		{name: "json number passes as float64", expr: "subject.level", want: float64(3), wantJSON: `3`},
		{name: "double", expr: "subject.level / 2.0", want: 1.5, wantJSON: `1.5`},
		{name: "bool", expr: "'admin' in subject.groups", want: true, wantJSON: `true`},
		{name: "list", expr: "subject.groups.filter(g, g != 'dev')", want: []any{"admin"}, wantJSON: `["admin"]`},
		{name: "empty list", expr: "subject.groups.filter(g, false)", want: []any{}, wantJSON: `[]`},
		{name: "map literal", expr: "{'tenant': subject.tenant, 'n': 1, 'tags': subject.profile.tags}",
			want:     map[string]any{"tenant": "acme", "n": int64(1), "tags": []any{"a", "b"}},
			wantJSON: `{"n":1,"tags":["a","b"],"tenant":"acme"}`},
		{name: "subject map passes through", expr: "subject.profile",
			want: map[string]any{"dept": "eng", "tags": []any{"a", "b"}}, wantJSON: `{"dept":"eng","tags":["a","b"]}`},
		{name: "null in a list", expr: "[null, 'x']", want: []any{nil, "x"}, wantJSON: `[null,"x"]`},
		{name: "timestamp", expr: "timestamp('2024-01-02T03:04:05Z')", want: "2024-01-02T03:04:05Z", wantJSON: `"2024-01-02T03:04:05Z"`},
		{name: "optional present", expr: "subject.?tenant.orValue('none')", want: "acme", wantJSON: `"acme"`},
		{name: "optional default", expr: "subject.?nick.orValue('none')", want: "none", wantJSON: `"none"`},
		{name: "optional none is absent", expr: "subject.?nick"},
		{name: "optional some", expr: "subject.?tenant", want: "acme", wantJSON: `"acme"`},
		{name: "null is absent", expr: "actor"},
		{name: "actor when present", expr: "actor.sub", in: RuleInput{Actor: map[string]any{"sub": "svc"}}, want: "svc", wantJSON: `"svc"`},
		{name: "client", expr: "client", in: RuleInput{Client: "billing"}, want: "billing", wantJSON: `"billing"`},
		{name: "request header", expr: "request.headers['x-tenant'][0]",
			in:   RuleInput{Request: &RequestInfo{Headers: map[string][]string{"X-Tenant": {"acme"}}}},
			want: "acme", wantJSON: `"acme"`},
		{name: "missing key: omitted", expr: "subject.nick", wantErr: "no such key"},
		{name: "index out of range: omitted", expr: "subject.sub.split('@')[1]", wantErr: "evaluation error"},
		{name: "bytes: omitted", expr: "b'abc'", wantErr: "no JSON form"},
		{name: "NaN: omitted", expr: "0.0 / 0.0", wantErr: "no JSON form"},
		{name: "non-string map key: omitted", expr: "{1: 'a'}", wantErr: "no JSON form"},
		{name: "type value: omitted", expr: "type(1)", wantErr: "no JSON form"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := mustCompileRules(t, RuleConfig{Claims: []ClaimRule{
				{Name: "c", Expr: tt.expr},
				{Name: "other", Expr: "'still set'"},
			}})
			in := tt.in
			if in.Subject == nil {
				in.Subject = ruleSubject()
			}
			res := mustEvaluate(t, r, in)
			if res.Denied {
				t.Fatalf("claims alone denied: %q", res.Reason)
			}
			if res.Claims["other"] != "still set" {
				t.Errorf("other claim = %v, want it set regardless of c", res.Claims["other"])
			}
			got, present := res.Claims["c"]
			switch {
			case tt.want == nil && present:
				t.Errorf("claim c = %#v, want it absent", got)
			case tt.want != nil && !reflect.DeepEqual(got, tt.want):
				t.Errorf("claim c = %#v (%T), want %#v (%T)", got, got, tt.want, tt.want)
			}
			if tt.wantJSON != "" {
				b, err := json.Marshal(got)
				if err != nil || string(b) != tt.wantJSON {
					t.Errorf("json(claim c) = %s, %v; want %s", b, err, tt.wantJSON)
				}
			}
			switch {
			case tt.wantErr == "" && len(res.Errors) != 0:
				t.Errorf("Errors = %q, want none", res.Errors)
			case tt.wantErr != "" && (len(res.Errors) != 1 || !strings.Contains(res.Errors[0], tt.wantErr) || !strings.HasPrefix(res.Errors[0], `claim c "`)):
				t.Errorf("Errors = %q, want one naming claim c and containing %q", res.Errors, tt.wantErr)
			}
		})
	}
}

// The computed claims do not alias the caller's input: mutating them leaves
// the subject intact.
func TestRulesClaimsDoNotAliasInput(t *testing.T) {
	r := mustCompileRules(t, RuleConfig{Claims: []ClaimRule{{Name: "p", Expr: "subject.profile"}}})
	sub := ruleSubject()
	res := mustEvaluate(t, r, RuleInput{Subject: sub})
	p := res.Claims["p"].(map[string]any)
	p["dept"] = "changed"
	p["tags"].([]any)[0] = "changed"
	prof := sub["profile"].(map[string]any)
	if prof["dept"] != "eng" || prof["tags"].([]any)[0] != "a" {
		t.Errorf("mutating a computed claim changed the subject: %v", prof)
	}
}

func TestRulesEvaluateConcurrently(t *testing.T) {
	r := mustCompileRules(t, RuleConfig{
		AllowIf: []string{"subject.email.endsWith('@example.com')"},
		DenyIf:  []string{"subject.sub == 'bob'"},
		Grants:  []GrantRule{{Scopes: []string{"admin:all"}, If: "'admin' in subject.groups"}},
		Claims:  []ClaimRule{{Name: "tenant", Expr: "subject.email.split('@')[1]"}, {Name: "who", Expr: "subject.sub"}},
	})
	const workers, rounds = 8, 200
	var wg sync.WaitGroup
	errs := make(chan string, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < rounds; i++ {
				name := fmt.Sprintf("user-%d-%d", w, i)
				admin := (w+i)%2 == 0
				groups := []any{"dev"}
				if admin {
					groups = append(groups, "admin")
				}
				if i%10 == 0 {
					name = "bob"
				}
				res, err := r.Evaluate(RuleInput{
					Subject: map[string]any{"sub": name, "email": name + "@example.com", "groups": groups},
					Request: &RequestInfo{Method: "GET", Headers: map[string][]string{"X-N": {name}}},
				})
				if err != nil {
					errs <- err.Error()
					return
				}
				if name == "bob" {
					if !res.Denied || res.Reason != `deny_if "subject.sub == 'bob'"` {
						errs <- fmt.Sprintf("bob not denied: %+v", res)
						return
					}
					continue
				}
				if res.Denied || res.Claims["who"] != name || res.Claims["tenant"] != "example.com" ||
					slices.Contains(res.Granted, "admin:all") != admin {
					errs <- fmt.Sprintf("worker %d round %d: %+v", w, i, res)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}
