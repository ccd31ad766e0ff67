package exchange

import (
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func TestScopeArithmetic(t *testing.T) {
	if got, err := ParseScope("  a b  a c "); err != nil || !reflect.DeepEqual(got, []string{"a", "b", "c"}) {
		t.Errorf("ParseScope = %q, %v", got, err)
	}
	m := ScopeMap{Map: map[string][]string{"read:calendar": {"calendar.events.read", "calendar.list"}}}
	if got := m.Apply([]string{"read:calendar", "other"}); !reflect.DeepEqual(got, []string{"calendar.events.read", "calendar.list"}) {
		t.Errorf("Apply dropped-unmapped = %q", got)
	}
	m.PassUnmapped = true
	if got := m.Apply([]string{"read:calendar", "other"}); !reflect.DeepEqual(got, []string{"calendar.events.read", "calendar.list", "other"}) {
		t.Errorf("Apply pass-unmapped = %q", got)
	}
	if got := (ScopeMap{}).Apply([]string{"x"}); !reflect.DeepEqual(got, []string{"x"}) {
		t.Errorf("no map = %q", got)
	}
	if got := IntersectScopes([]string{"a", "b", "c"}, []string{"c", "a", "z"}); !reflect.DeepEqual(got, []string{"a", "c"}) {
		t.Errorf("IntersectScopes = %q", got)
	}
	if got := IntersectScopes([]string{"a"}, nil); len(got) != 0 {
		t.Errorf("intersection with nothing held = %q", got)
	}
	for _, bad := range []any{42, []any{"a", 1}, map[string]any{}} {
		if _, err := scopesFromClaim(bad); err == nil {
			t.Errorf("scopesFromClaim(%#v) accepted", bad)
		}
	}
}

func TestActChain(t *testing.T) {
	prior := map[string]any{"sub": "svc-a", "act": map[string]any{"sub": "svc-b"}}
	got := nestAct(Actor{Subject: "gw"}, prior)
	want := map[string]any{"sub": "gw", "act": prior}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("nestAct = %#v", got)
	}
	if d, err := checkActChain(got, 5); err != nil || d != 3 {
		t.Fatalf("depth = %d, %v", d, err)
	}
	if _, err := checkActChain(got, 2); err == nil {
		t.Fatal("depth 3 accepted with limit 2")
	}
	if _, err := checkActChain(map[string]any{"sub": "a", "act": []any{"b"}}, 5); err == nil {
		t.Fatal("non-object nested act accepted")
	}
}

// TestScopeDelimiterIsSpaceOnly: RFC 6749 §3.3 delimits scope tokens with
// %x20 alone. strings.Fields also split on NBSP, U+0085 and tabs, so
// "tenant:acme\u00a0orders.write" granted orders.write (issue 9 §6).
func TestScopeDelimiterIsSpaceOnly(t *testing.T) {
	for _, s := range []string{
		"tenant:acme\u00a0orders.write",
		"tenant:acme\u0085orders.write",
		"tenant:acme\u2003orders.write",
		"tenant:acme\torders.write",
		"tenant:acme\norders.write",
		"tenant:acme\x00orders.write",
		`tenant:"acme"`,
		`tenant\acme`,
	} {
		if got, err := ParseScope(s); err == nil {
			t.Errorf("ParseScope(%q) = %q, want an error", s, got)
		}
		if got, err := scopesFromClaim(s); err == nil {
			t.Errorf("scopesFromClaim(%q) = %q, want an error", s, got)
		}
		if got, err := scopesFromClaim([]any{"orders.read", s}); err == nil {
			t.Errorf("scopesFromClaim([.., %q]) = %q, want an error", s, got)
		}
	}
	if got, err := scopesFromClaim([]any{"a b", "c"}); err != nil || !reflect.DeepEqual(got, []string{"a", "b", "c"}) {
		t.Errorf("scp array = %q, %v", got, err)
	}
}

// TestScopeParsingIsBoundedAndLinear: a 64 KiB body of distinct scopes is
// refused by count; duplicates do not count (issue 9 §5).
func TestScopeParsingIsBoundedAndLinear(t *testing.T) {
	var b strings.Builder
	for i := 0; i < 16000; i++ {
		fmt.Fprintf(&b, "s%d ", i)
	}
	if _, err := ParseScope(b.String()); err == nil {
		t.Fatal("16000 distinct scopes accepted")
	}
	got, err := ParseScope(strings.Repeat("a b ", 16000))
	if err != nil || !reflect.DeepEqual(got, []string{"a", "b"}) {
		t.Fatalf("repeated scopes = %q, %v", got, err)
	}
	max := make([]string, MaxScopeTokens)
	for i := range max {
		max[i] = fmt.Sprint("s", i)
	}
	if got, err := ParseScope(strings.Join(max, " ")); err != nil || len(got) != MaxScopeTokens {
		t.Fatalf("%d scopes: %d, %v", MaxScopeTokens, len(got), err)
	}
}
