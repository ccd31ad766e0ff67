package exchange

import (
	"fmt"
	"slices"
	"strings"
)

// ParseScope splits a space-delimited scope string (RFC 6749 §3.3) into its
// distinct scope tokens, keeping their first-seen order.
func ParseScope(s string) []string {
	fields := strings.Fields(s)
	out := fields[:0]
	for _, f := range fields {
		if !slices.Contains(out, f) {
			out = append(out, f)
		}
	}
	return out
}

// FormatScope joins scopes into the space-delimited wire form.
func FormatScope(scopes []string) string { return strings.Join(scopes, " ") }

// scopesFromClaim reads the subject's scopes from a claim value: a
// space-delimited string (`scope`, RFC 8693 §4.2) or an array of strings
// (`scp`, as several IdPs issue). Any other shape is an error, never a guess.
func scopesFromClaim(v any) ([]string, error) {
	switch v := v.(type) {
	case nil:
		return nil, nil
	case string:
		return ParseScope(v), nil
	case []any:
		out := make([]string, 0, len(v))
		for _, e := range v {
			s, ok := e.(string)
			if !ok {
				return nil, fmt.Errorf("scope array holds a %T, not a string", e)
			}
			for _, f := range strings.Fields(s) {
				if !slices.Contains(out, f) {
					out = append(out, f)
				}
			}
		}
		return out, nil
	case []string:
		return ParseScope(strings.Join(v, " ")), nil
	default:
		return nil, fmt.Errorf("scope claim is a %T, not a string or an array of strings", v)
	}
}

// ScopeMap translates an issuer's scopes into the gateway's vocabulary.
type ScopeMap struct {
	// Map is external scope -> internal scopes.
	Map map[string][]string
	// PassUnmapped keeps external scopes that have no mapping; by default
	// they are dropped, so a mapping can never widen by omission.
	PassUnmapped bool
}

// Apply maps external scopes to internal ones. With no mapping configured at
// all, scopes pass through unchanged.
func (m ScopeMap) Apply(external []string) []string {
	if len(m.Map) == 0 {
		return external
	}
	out := make([]string, 0, len(external))
	add := func(s string) {
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	for _, s := range external {
		internal, ok := m.Map[s]
		switch {
		case ok:
			for _, i := range internal {
				add(i)
			}
		case m.PassUnmapped:
			add(s)
		}
	}
	return out
}

// IntersectScopes returns the scopes of offered that are also in held, in the
// order of offered. It is the down-scoping rule: the result never holds a
// scope that is not in both.
func IntersectScopes(offered, held []string) []string {
	out := make([]string, 0, len(offered))
	for _, s := range offered {
		if slices.Contains(held, s) && !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out
}

// missingScopes returns the scopes of required that granted lacks.
func missingScopes(required, granted []string) []string {
	var out []string
	for _, s := range required {
		if !slices.Contains(granted, s) {
			out = append(out, s)
		}
	}
	return out
}
