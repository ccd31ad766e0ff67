package exchange

import (
	"reflect"
	"testing"
)

func TestScopeArithmetic(t *testing.T) {
	if got := ParseScope("  a b  a\tc "); !reflect.DeepEqual(got, []string{"a", "b", "c"}) {
		t.Errorf("ParseScope = %q", got)
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
