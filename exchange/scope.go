package exchange

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// MaxScopeTokens caps the scope tokens of one scope parameter or claim, so
// every later step (mapping, intersection, rules) works on a bounded list.
const MaxScopeTokens = 256

// Ways a scope string fails RFC 6749 §3.3.
var (
	errScopeToken   = errors.New("scope tokens are printable ASCII without space, quote or backslash, separated by single spaces (RFC 6749 section 3.3)")
	errTooManyScope = fmt.Errorf("more than %d scope tokens", MaxScopeTokens)
)

// ParseScope splits a scope string (RFC 6749 §3.3) into its distinct scope
// tokens, in first-seen order. The delimiter is the space (%x20) alone: any
// other character outside the scope-token set (tabs, NBSP, U+0085 and every
// other Unicode space among them) makes the whole string invalid, never a
// second delimiter. Runs of spaces are tolerated. Linear in len(s).
func ParseScope(s string) ([]string, error) {
	var p scopeParser
	if err := p.add(s); err != nil {
		return nil, err
	}
	return p.out, nil
}

// scopeParser collects distinct scope tokens from one or more strings.
type scopeParser struct {
	out  []string
	seen map[string]struct{}
}

func (p *scopeParser) add(s string) error {
	start := -1
	for i := 0; i <= len(s); i++ {
		if i == len(s) || s[i] == ' ' {
			if start >= 0 {
				if err := p.token(s[start:i]); err != nil {
					return err
				}
				start = -1
			}
			continue
		}
		if c := s[i]; c < 0x21 || c > 0x7e || c == '"' || c == '\\' {
			return errScopeToken
		}
		if start < 0 {
			start = i
		}
	}
	return nil
}

func (p *scopeParser) token(tok string) error {
	if p.seen == nil {
		p.seen = make(map[string]struct{})
	}
	if _, dup := p.seen[tok]; dup {
		return nil
	}
	if len(p.out) == MaxScopeTokens {
		return errTooManyScope
	}
	p.seen[tok] = struct{}{}
	p.out = append(p.out, tok)
	return nil
}

// FormatScope joins scopes into the space-delimited wire form.
func FormatScope(scopes []string) string { return strings.Join(scopes, " ") }

// scopesFromClaim reads the subject's scopes from a claim value: a
// space-delimited string (`scope`, RFC 8693 §4.2) or an array of strings
// (`scp`, as several IdPs issue). Any other shape, and any character outside
// the scope-token set, is an error, never a guess or a silent trim.
func scopesFromClaim(v any) ([]string, error) {
	var p scopeParser
	switch v := v.(type) {
	case nil:
		return nil, nil
	case string:
		if err := p.add(v); err != nil {
			return nil, err
		}
	case []any:
		if len(v) > MaxScopeTokens {
			return nil, errTooManyScope
		}
		for _, e := range v {
			s, ok := e.(string)
			if !ok {
				return nil, fmt.Errorf("scope array holds a %T, not a string", e)
			}
			if err := p.add(s); err != nil {
				return nil, err
			}
		}
	default:
		return nil, fmt.Errorf("scope claim is a %T, not a string or an array of strings", v)
	}
	return p.out, nil
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
