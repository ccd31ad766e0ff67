package caddymodule

import (
	"strings"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-token-exchange/caddy-token-exchange/exchange"
)

// Policy is the CEL policy of a route or a client. Expressions see
// `subject` (claims), `actor` (actor token claims or null), `request`
// (method, host, path, remote_ip, headers; null on the endpoint), `client`
// (client_id or null) and `route` (audiences, scopes).
type Policy struct {
	// AllowIf: every expression must hold, else the exchange is denied.
	AllowIf []string `json:"allow_if,omitempty"`
	// DenyIf: any expression that holds denies the exchange.
	DenyIf []string `json:"deny_if,omitempty"`
	// Grants add scopes when their condition holds; the route's or
	// client's scope still caps them.
	Grants []PolicyGrant `json:"grants,omitempty"`
	// ComputedClaims are claims of the minted token computed from expressions.
	ComputedClaims []PolicyClaim `json:"computed_claims,omitempty"`
}

// PolicyGrant is `grant <scope...> if <expr>`.
type PolicyGrant struct {
	Scopes []string `json:"scopes"`
	If     string   `json:"if"`
}

// PolicyClaim is `claim <name> <expr>`.
type PolicyClaim struct {
	Name string `json:"name"`
	Expr string `json:"expr"`
}

func (p Policy) config() exchange.RuleConfig {
	cfg := exchange.RuleConfig{AllowIf: p.AllowIf, DenyIf: p.DenyIf}
	for _, g := range p.Grants {
		cfg.Grants = append(cfg.Grants, exchange.GrantRule{Scopes: g.Scopes, If: g.If})
	}
	for _, c := range p.ComputedClaims {
		cfg.Claims = append(cfg.Claims, exchange.ClaimRule{Name: c.Name, Expr: c.Expr})
	}
	return cfg
}

// compile type-checks the policy; nil when there is none.
func (p Policy) compile() (*exchange.Rules, error) {
	if len(p.AllowIf)+len(p.DenyIf)+len(p.Grants)+len(p.ComputedClaims) == 0 {
		return nil, nil
	}
	return exchange.CompileRules(p.config())
}

// unmarshalPolicyLine parses one policy subdirective if d is at one, and
// type-checks it right away so a bad expression names its Caddyfile line.
// Expressions are the rest of the line, read raw as Caddy's own `expression`
// matcher reads them: double-quoted CEL strings stay strings, so
// `deny_if subject.sub == "client"` compares with the string "client" and
// never with the variable of that name. Single quotes work as in CEL, and
// backticks wrap an expression of several words without further meaning.
func (p *Policy) unmarshalPolicyLine(d *caddyfile.Dispenser) (bool, error) {
	var single Policy
	switch d.Val() {
	case "allow_if", "deny_if":
		kind := d.Val()
		expr := strings.Join(rawArgs(d), " ")
		if expr == "" {
			return true, d.ArgErr()
		}
		if kind == "allow_if" {
			single.AllowIf = []string{expr}
		} else {
			single.DenyIf = []string{expr}
		}
	case "grant":
		// Scopes are plain words up to the `if`; the condition is raw.
		var scopes []string
		for d.NextArg() && d.Val() != "if" {
			scopes = append(scopes, d.Val())
		}
		cond := strings.Join(rawArgs(d), " ")
		if len(scopes) == 0 || cond == "" {
			return true, d.Err("grant needs scopes and a condition: grant <scope...> if <expr>")
		}
		single.Grants = []PolicyGrant{{Scopes: scopes, If: cond}}
	case "claim":
		if !d.NextArg() {
			return true, d.Err("claim needs a name and an expression: claim <name> <expr>")
		}
		name := d.Val()
		expr := strings.Join(rawArgs(d), " ")
		if expr == "" {
			return true, d.Err("claim needs a name and an expression: claim <name> <expr>")
		}
		single.ComputedClaims = []PolicyClaim{{Name: name, Expr: expr}}
	default:
		return false, nil
	}
	if _, err := single.compile(); err != nil {
		return true, d.Errf("%v", err)
	}
	p.AllowIf = append(p.AllowIf, single.AllowIf...)
	p.DenyIf = append(p.DenyIf, single.DenyIf...)
	p.Grants = append(p.Grants, single.Grants...)
	p.ComputedClaims = append(p.ComputedClaims, single.ComputedClaims...)
	return true, nil
}

// rawArgs returns the remaining arguments on the line as CEL source text.
// A double-quoted token becomes a CEL string literal again (the lexer took
// its quotes away and unescaped \"), whatever else the line holds: unlike
// Caddy's expression matcher there is no single-token shortcut, so
// `claim tier "client"` is the string "client", never the variable. A
// backtick-quoted token or a heredoc is expression text as written.
func rawArgs(d *caddyfile.Dispenser) []string {
	var args []string
	for d.NextArg() {
		text, raw := d.Val(), d.ValRaw()
		if raw != text && raw[0] == '"' {
			text = `"` + strings.ReplaceAll(text, `"`, `\"`) + `"`
		}
		args = append(args, text)
	}
	return args
}
