package exchange

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/caddy-token-exchange/caddy-token-exchange/internal/testidp"
)

// Fuzz targets (go test -fuzz): CI runs each for a short fixed time (see
// .ci/run); anything they find is kept under testdata/fuzz as a regression seed.

func FuzzParseTokenRequest(f *testing.F) {
	for _, seed := range []string{
		"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token=a.b.c&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token",
		"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token=x&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt&audience=a&audience=b&resource=https%3A%2F%2Fr.test%2Fx&scope=a+b&actor_token=y&actor_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt",
		"grant_type=client_credentials",
		"scope=a&scope=b",
		"resource=%23frag",
		"",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, query string) {
		form, err := url.ParseQuery(query)
		if err != nil {
			return
		}
		req, err := ParseTokenRequest(form)
		if err != nil {
			e := AsError(err)
			if e.Kind == KindServer || e.Description == "" {
				t.Fatalf("malformed request gave %v", err)
			}
			return
		}
		if req.GrantType != GrantTypeTokenExchange || req.SubjectToken == "" || req.SubjectTokenType == "" {
			t.Fatalf("accepted an incomplete request: %+v", req)
		}
		if (req.ActorToken == "") != (req.ActorTokenType == "") {
			t.Fatalf("accepted actor_token without its type or the reverse")
		}
		if req.RequestedTokenType != TokenTypeAccessToken && req.RequestedTokenType != TokenTypeJWT {
			t.Fatalf("accepted requested_token_type %q", req.RequestedTokenType)
		}
		for _, r := range req.Resources {
			u, err := url.Parse(r)
			if err != nil || !u.IsAbs() || strings.Contains(r, "#") {
				t.Fatalf("accepted resource %q", r)
			}
		}
	})
}

func FuzzParseScope(f *testing.F) {
	for _, seed := range []string{"a b c", "  a\tb  a ", "", "read:calendar calendar.events.read", "tenant:acme\u00a0orders.write", "a\u0085b"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, s string) {
		scopes, err := ParseScope(s)
		// The reference: RFC 6749 §3.3 with %x20 as the only delimiter.
		valid := true
		for _, r := range s {
			if r != ' ' && (r < 0x21 || r > 0x7e || r == '"' || r == '\\') {
				valid = false
			}
		}
		distinct := map[string]bool{}
		for _, f := range strings.Split(s, " ") {
			if f != "" {
				distinct[f] = true
			}
		}
		if valid && len(distinct) > MaxScopeTokens {
			valid = false
		}
		if (err == nil) != valid {
			t.Fatalf("ParseScope(%q) err = %v, want valid=%v", s, err, valid)
		}
		for i, sc := range scopes {
			if sc == "" || strings.ContainsAny(sc, " \t\n\r\u00a0\u0085") || !distinct[sc] {
				t.Fatalf("scope %q", sc)
			}
			if slices.Contains(scopes[i+1:], sc) {
				t.Fatalf("duplicate %q", sc)
			}
		}
		if valid && len(scopes) != len(distinct) {
			t.Fatalf("%d scopes, want %d", len(scopes), len(distinct))
		}
		if got, _ := ParseScope(FormatScope(scopes)); !slices.Equal(got, scopes) {
			t.Fatalf("round trip %q -> %q", scopes, got)
		}
	})
}

func FuzzCheckStrictJSON(f *testing.F) {
	for _, seed := range []string{`{"a":1}`, `{"a":1,"a":2}`, `{"a":{"b":[1,{"c":2}]}}`, "{\"a\":\"\xff\"}", `[`} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		// Syntax is json.Unmarshal's job; on valid JSON the fast checker must
		// agree with the obvious (slow) one.
		if !json.Valid(b) {
			_ = checkStrictJSON(b)
			return
		}
		fast, slow := checkStrictJSON(b) == nil, referenceStrictJSON(b) == nil
		if fast != slow {
			t.Fatalf("checkStrictJSON=%v reference=%v on %q", fast, slow, b)
		}
	})
}

// referenceStrictJSON is the obvious implementation: walk encoding/json's
// tokens with a set of member names per object.
func referenceStrictJSON(b []byte) error {
	if !utf8.Valid(b) {
		return errors.New("not valid UTF-8")
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber() // numbers out of float64 range are still valid JSON
	type frame struct {
		keys    map[string]bool
		wantKey bool
	}
	var stack []*frame
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		var top *frame
		if len(stack) > 0 {
			top = stack[len(stack)-1]
		}
		switch t := tok.(type) {
		case json.Delim:
			switch t {
			case '{':
				if top != nil && top.keys != nil {
					top.wantKey = true
				}
				stack = append(stack, &frame{keys: map[string]bool{}, wantKey: true})
			case '[':
				if top != nil && top.keys != nil {
					top.wantKey = true
				}
				stack = append(stack, &frame{})
			default:
				stack = stack[:len(stack)-1]
			}
		case string:
			if top != nil && top.keys != nil && top.wantKey {
				if top.keys[t] {
					return fmt.Errorf("duplicate %q", t)
				}
				top.keys[t] = true
				top.wantKey = false
				continue
			}
			if top != nil && top.keys != nil {
				top.wantKey = true
			}
		default:
			if top != nil && top.keys != nil {
				top.wantKey = true
			}
		}
	}
}

// FuzzVerify feeds arbitrary bytes down the inbound-token path: bytes in,
// verdict out, never a panic, and never an acceptance of anything the
// issuer's key did not sign.
func FuzzVerify(f *testing.F) {
	idp := testidp.New(f, "https://idp.test")
	kid := idp.AddKey("k", "ES256")
	path := filepath.Join(f.TempDir(), "jwks.json")
	if err := os.WriteFile(path, idp.JWKS(), 0o600); err != nil {
		f.Fatal(err)
	}
	cfg := IssuerConfig{Issuer: "https://idp.test", JWKSFile: path, Audiences: []string{"https://gateway.test"}, Algorithms: []string{"ES256", "RS256"}}
	ts, err := NewTrustStore(context.Background(), TrustConfig{Issuers: []IssuerConfig{cfg}})
	if err != nil {
		f.Fatal(err)
	}
	valid := idp.Token(kid, testidp.Claims{"scope": "a b", "act": map[string]any{"sub": "x"}, "exp": time.Now().Add(24 * time.Hour).Unix()})
	f.Add(valid)
	parts := strings.Split(valid, ".")
	f.Add(parts[0] + "." + parts[1] + ".")
	f.Add("eyJhbGciOiJub25lIn0." + parts[1] + ".")
	f.Add("a.b.c.d.e")
	f.Add(strings.Repeat("A", 100))
	f.Fuzz(func(t *testing.T, raw string) {
		s, err := ts.Verify(context.Background(), raw, VerifyOptions{})
		if err != nil {
			e := AsError(err)
			if e.Kind != KindInvalidToken {
				t.Fatalf("kind %d for bad input: %v", e.Kind, err)
			}
			if len(raw) > 12 && strings.Contains(e.Description, raw) {
				t.Fatal("description echoes the token")
			}
			return
		}
		// Only the issuer can have signed it: the signing input must be
		// exactly one the issuer produced (the fuzzer cannot forge ES256).
		if raw != valid {
			t.Fatalf("accepted a token the issuer did not sign: %q", raw)
		}
		if s.Subject == "" || s.Expiry.IsZero() {
			t.Fatalf("accepted subject %+v", s)
		}
	})
}
