package exchange

import (
	"errors"
	"fmt"
	"net/url"
	"reflect"
	"strings"
	"testing"
)

// testSubjectToken looks like a JWT so a test can tell if it leaks.
const testSubjectToken = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXN1YmplY3Q"
const testActorToken = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJnYXRld2F5In0.c2lnbmF0dXJlLWFjdG9y"

// baseForm is a minimal valid request; mutate adds, replaces or deletes.
func baseForm(mutate func(url.Values)) url.Values {
	f := url.Values{
		"grant_type":         {GrantTypeTokenExchange},
		"subject_token":      {testSubjectToken},
		"subject_token_type": {TokenTypeAccessToken},
	}
	if mutate != nil {
		mutate(f)
	}
	return f
}

func TestParseTokenRequestValid(t *testing.T) {
	tests := []struct {
		name string
		form url.Values
		want TokenRequest
	}{
		{
			name: "minimal request defaults requested_token_type to access_token",
			form: baseForm(nil),
			want: TokenRequest{
				GrantType: GrantTypeTokenExchange, SubjectToken: testSubjectToken,
				SubjectTokenType: TokenTypeAccessToken, RequestedTokenType: TokenTypeAccessToken,
			},
		},
		{
			name: "everything, repeated audience and resource in order without duplicates",
			form: baseForm(func(f url.Values) {
				f["audience"] = []string{"orders", "billing", "orders"}
				f["resource"] = []string{"https://orders.internal/api", "urn:example:billing"}
				f.Set("scope", "orders.read  orders.write orders.read")
				f.Set("requested_token_type", TokenTypeJWT)
				f.Set("subject_token_type", TokenTypeJWT)
				f.Set("actor_token", testActorToken)
				f.Set("actor_token_type", TokenTypeIDToken)
				f.Set("client_id", "billing-svc")
				f.Set("client_secret", "s3cret")
				f.Set("client_assertion", "a.b.c")
				f.Set("client_assertion_type", ClientAssertionTypeJWTBearer)
				f.Set("unknown_param", "ignored")
				f["another_unknown"] = []string{"x", "y"}
			}),
			want: TokenRequest{
				GrantType:          GrantTypeTokenExchange,
				Audiences:          []string{"orders", "billing"},
				Resources:          []string{"https://orders.internal/api", "urn:example:billing"},
				Scopes:             []string{"orders.read", "orders.write"},
				RequestedTokenType: TokenTypeJWT,
				SubjectToken:       testSubjectToken, SubjectTokenType: TokenTypeJWT,
				ActorToken: testActorToken, ActorTokenType: TokenTypeIDToken,
				ClientID: "billing-svc", ClientSecret: "s3cret",
				ClientAssertion: "a.b.c", ClientAssertionType: ClientAssertionTypeJWTBearer,
			},
		},
		{
			name: "explicit access_token requested",
			form: baseForm(func(f url.Values) { f.Set("requested_token_type", TokenTypeAccessToken) }),
			want: TokenRequest{
				GrantType: GrantTypeTokenExchange, SubjectToken: testSubjectToken,
				SubjectTokenType: TokenTypeAccessToken, RequestedTokenType: TokenTypeAccessToken,
			},
		},
		{
			// RFC 6749 §3.2: a parameter without a value is omitted, also
			// a repeatable one, and an empty duplicate is no duplicate.
			name: "empty audience, resource and duplicate scope count as omitted",
			form: baseForm(func(f url.Values) {
				f["audience"] = []string{"", "orders", ""}
				f["resource"] = []string{""}
				f["scope"] = []string{"", "a"}
			}),
			want: TokenRequest{
				GrantType: GrantTypeTokenExchange, SubjectToken: testSubjectToken,
				SubjectTokenType: TokenTypeAccessToken, RequestedTokenType: TokenTypeAccessToken,
				Audiences: []string{"orders"}, Scopes: []string{"a"},
			},
		},
		{
			name: "empty scope and empty single parameters count as omitted",
			form: baseForm(func(f url.Values) {
				f.Set("scope", "")
				f.Set("requested_token_type", "")
				f.Set("actor_token", "")
				f.Set("actor_token_type", "")
			}),
			want: TokenRequest{
				GrantType: GrantTypeTokenExchange, SubjectToken: testSubjectToken,
				SubjectTokenType: TokenTypeAccessToken, RequestedTokenType: TokenTypeAccessToken,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseTokenRequest(tt.form)
			if err != nil {
				t.Fatalf("ParseTokenRequest: %v", err)
			}
			if !reflect.DeepEqual(*got, tt.want) {
				t.Errorf("got  %+v\nwant %+v", *got, tt.want)
			}
		})
	}
}

func TestParseTokenRequestAllSubjectTokenTypes(t *testing.T) {
	for name, urn := range tokenTypeURNs {
		got, err := ParseTokenRequest(baseForm(func(f url.Values) {
			f.Set("subject_token_type", urn)
			f.Set("actor_token", testActorToken)
			f.Set("actor_token_type", urn)
		}))
		if err != nil {
			t.Errorf("%s: %v", urn, err)
			continue
		}
		if got.SubjectTokenType != urn || got.SubjectTokenTypeName() != name || got.ActorTokenTypeName() != name {
			t.Errorf("%s: got type %q, names %q/%q, want %q", urn, got.SubjectTokenType,
				got.SubjectTokenTypeName(), got.ActorTokenTypeName(), name)
		}
	}
}

func TestParseTokenRequestErrors(t *testing.T) {
	tests := []struct {
		name       string
		form       url.Values
		kind       Kind
		reason     string
		descHas    []string
		descHasNot []string
	}{
		{"grant_type missing", baseForm(func(f url.Values) { f.Del("grant_type") }),
			KindInvalidRequest, "missing_grant_type", []string{"grant_type"}, nil},
		{"grant_type empty", baseForm(func(f url.Values) { f.Set("grant_type", "") }),
			KindInvalidRequest, "missing_grant_type", []string{"grant_type"}, nil},
		{"grant_type other", baseForm(func(f url.Values) { f.Set("grant_type", "client_credentials") }),
			KindUnsupportedGrantType, "unsupported_grant_type", []string{GrantTypeTokenExchange}, nil},
		{"grant_type short name", baseForm(func(f url.Values) { f.Set("grant_type", "token-exchange") }),
			KindUnsupportedGrantType, "unsupported_grant_type", nil, nil},
		{"grant_type twice", baseForm(func(f url.Values) { f.Add("grant_type", GrantTypeTokenExchange) }),
			KindInvalidRequest, "duplicate_parameter", []string{"parameter grant_type given more than once"}, nil},
		{"subject_token missing", baseForm(func(f url.Values) { f.Del("subject_token") }),
			KindInvalidRequest, "missing_subject_token", []string{"subject_token is required"}, nil},
		{"subject_token empty", baseForm(func(f url.Values) { f.Set("subject_token", "") }),
			KindInvalidRequest, "missing_subject_token", nil, nil},
		{"subject_token twice", baseForm(func(f url.Values) { f.Add("subject_token", "other") }),
			KindInvalidRequest, "duplicate_parameter", []string{"parameter subject_token given more than once"}, nil},
		{"subject_token_type missing", baseForm(func(f url.Values) { f.Del("subject_token_type") }),
			KindInvalidRequest, "missing_subject_token_type", []string{"subject_token_type is required"}, nil},
		{"subject_token_type twice", baseForm(func(f url.Values) { f.Add("subject_token_type", TokenTypeJWT) }),
			KindInvalidRequest, "duplicate_parameter", []string{"subject_token_type given more than once"}, nil},
		{"subject_token_type unknown URN is named", baseForm(func(f url.Values) {
			f.Set("subject_token_type", "urn:ietf:params:oauth:token-type:made_up")
		}), KindInvalidRequest, "unsupported_token_type",
			[]string{"subject_token_type urn:ietf:params:oauth:token-type:made_up is not a supported token type", TokenTypeAccessToken}, nil},
		{"subject_token_type short name refused", baseForm(func(f url.Values) { f.Set("subject_token_type", "access_token") }),
			KindInvalidRequest, "unsupported_token_type", []string{"must be a token type URN such as " + TokenTypeAccessToken}, nil},
		{"subject_token_type holding a token is not echoed", baseForm(func(f url.Values) { f.Set("subject_token_type", testSubjectToken) }),
			KindInvalidRequest, "unsupported_token_type", []string{"subject_token_type is not a supported token type"}, []string{testSubjectToken}},
		{"subject_token_type with quotes is not echoed", baseForm(func(f url.Values) { f.Set("subject_token_type", `urn:"x"`) }),
			KindInvalidRequest, "unsupported_token_type", nil, []string{`urn:"x"`}},
		{"actor_token without actor_token_type", baseForm(func(f url.Values) { f.Set("actor_token", testActorToken) }),
			KindInvalidRequest, "missing_actor_token_type", []string{"actor_token_type is required"}, []string{testActorToken}},
		{"actor_token_type without actor_token", baseForm(func(f url.Values) { f.Set("actor_token_type", TokenTypeAccessToken) }),
			KindInvalidRequest, "unexpected_actor_token_type", []string{"must not be present without actor_token"}, nil},
		{"actor_token_type unknown", baseForm(func(f url.Values) {
			f.Set("actor_token", testActorToken)
			f.Set("actor_token_type", "urn:example:token")
		}), KindInvalidRequest, "unsupported_token_type", []string{"actor_token_type urn:example:token is not a supported"}, []string{testActorToken}},
		{"actor_token_type short name", baseForm(func(f url.Values) {
			f.Set("actor_token", testActorToken)
			f.Set("actor_token_type", "jwt")
		}), KindInvalidRequest, "unsupported_token_type", []string{"actor_token_type must be a token type URN such as " + TokenTypeJWT}, nil},
		{"actor_token twice", baseForm(func(f url.Values) {
			f["actor_token"] = []string{testActorToken, testActorToken}
			f.Set("actor_token_type", TokenTypeAccessToken)
		}), KindInvalidRequest, "duplicate_parameter", []string{"parameter actor_token given more than once"}, []string{testActorToken}},
		{"actor_token_type twice", baseForm(func(f url.Values) {
			f.Set("actor_token", testActorToken)
			f["actor_token_type"] = []string{TokenTypeAccessToken, TokenTypeAccessToken}
		}), KindInvalidRequest, "duplicate_parameter", []string{"parameter actor_token_type given more than once"}, nil},
		{"scope twice", baseForm(func(f url.Values) { f["scope"] = []string{"a", "b"} }),
			KindInvalidRequest, "duplicate_parameter", []string{"parameter scope given more than once"}, nil},
		{"requested_token_type twice", baseForm(func(f url.Values) {
			f["requested_token_type"] = []string{TokenTypeJWT, TokenTypeJWT}
		}), KindInvalidRequest, "duplicate_parameter", []string{"parameter requested_token_type given more than once"}, nil},
		{"client_id twice", baseForm(func(f url.Values) { f["client_id"] = []string{"a", "a"} }),
			KindInvalidRequest, "duplicate_parameter", []string{"parameter client_id given more than once"}, nil},
		{"client_secret twice", baseForm(func(f url.Values) { f["client_secret"] = []string{"a", "b"} }),
			KindInvalidRequest, "duplicate_parameter", []string{"parameter client_secret given more than once"}, nil},
		{"client_assertion twice", baseForm(func(f url.Values) { f["client_assertion"] = []string{"a", "b"} }),
			KindInvalidRequest, "duplicate_parameter", []string{"parameter client_assertion given more than once"}, nil},
		{"client_assertion_type twice", baseForm(func(f url.Values) {
			f["client_assertion_type"] = []string{ClientAssertionTypeJWTBearer, ClientAssertionTypeJWTBearer}
		}), KindInvalidRequest, "duplicate_parameter", []string{"parameter client_assertion_type given more than once"}, nil},
		{"requested_token_type refresh_token", baseForm(func(f url.Values) { f.Set("requested_token_type", TokenTypeRefreshToken) }),
			KindInvalidRequest, "unsupported_requested_token_type", []string{TokenTypeAccessToken, TokenTypeJWT}, nil},
		{"requested_token_type short name", baseForm(func(f url.Values) { f.Set("requested_token_type", "access_token") }),
			KindInvalidRequest, "unsupported_requested_token_type", []string{TokenTypeAccessToken, TokenTypeJWT}, nil},
		{"65 distinct audiences", baseForm(func(f url.Values) {
			for i := 0; i < 65; i++ {
				f.Add("audience", fmt.Sprint("aud-", i))
			}
		}), KindInvalidRequest, "too_many_targets", []string{"audience"}, nil},
		{"relative resource", baseForm(func(f url.Values) { f.Set("resource", "/orders") }),
			KindInvalidTarget, "invalid_resource", []string{"absolute URI"}, nil},
		{"resource without scheme", baseForm(func(f url.Values) { f.Set("resource", "orders.internal") }),
			KindInvalidTarget, "invalid_resource", nil, nil},
		{"resource with fragment", baseForm(func(f url.Values) { f.Set("resource", "https://orders.internal/api#x") }),
			KindInvalidTarget, "invalid_resource", []string{"fragment"}, nil},
		{"resource with empty fragment", baseForm(func(f url.Values) { f.Set("resource", "https://orders.internal/#") }),
			KindInvalidTarget, "invalid_resource", nil, nil},
		{"resource scheme only", baseForm(func(f url.Values) { f.Set("resource", "https://") }),
			KindInvalidTarget, "invalid_resource", nil, nil},
		{"resource unparsable", baseForm(func(f url.Values) { f.Set("resource", "https://[::1") }),
			KindInvalidTarget, "invalid_resource", nil, nil},
		{"second resource invalid", baseForm(func(f url.Values) {
			f["resource"] = []string{"https://ok.example", "not a uri"}
		}), KindInvalidTarget, "invalid_resource", nil, nil},
		{"scope with a quote", baseForm(func(f url.Values) { f.Set("scope", `read "write"`) }),
			KindInvalidScope, "malformed_scope", nil, nil},
		{"scope with non-ASCII", baseForm(func(f url.Values) { f.Set("scope", "lecture écriture") }),
			KindInvalidScope, "malformed_scope", nil, nil},
		{"scope with a tab", baseForm(func(f url.Values) { f.Set("scope", "a\tb") }),
			KindInvalidScope, "malformed_scope", nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseTokenRequest(tt.form)
			if err == nil {
				t.Fatalf("ParseTokenRequest accepted the request: %+v", got)
			}
			if got != nil {
				t.Errorf("request returned with the error: %+v", got)
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("error is %T, want *Error", err)
			}
			if e.Kind != tt.kind || e.Reason != tt.reason {
				t.Errorf("kind %d reason %q, want kind %d reason %q (%v)", e.Kind, e.Reason, tt.kind, tt.reason, e)
			}
			for _, s := range tt.descHas {
				if !strings.Contains(e.Description, s) {
					t.Errorf("description %q lacks %q", e.Description, s)
				}
			}
			for _, s := range append(tt.descHasNot, testSubjectToken, testActorToken) {
				if strings.Contains(e.Description, s) {
					t.Errorf("description %q repeats %q", e.Description, s)
				}
			}
			if !validErrorDescription(e.Description) {
				t.Errorf("description %q has characters RFC 6749 section 5.2 forbids", e.Description)
			}
		})
	}
}

func TestIsResourceURI(t *testing.T) {
	for s, want := range map[string]bool{
		"https://orders.internal":       true,
		"https://orders.internal/a?b=c": true,
		"urn:example:orders":            true,
		"file:///srv/x":                 true,
		"https:":                        false,
		"//orders.internal/a":           false,
		"orders":                        false,
		"https://orders.internal/#":     false,
		"https://orders.internal/#frag": false,
	} {
		if got := isResourceURI(s); got != want {
			t.Errorf("isResourceURI(%q) = %v, want %v", s, got, want)
		}
	}
}

// validErrorDescription checks RFC 6749 §5.2: %x20-21 / %x23-5B / %x5D-7E.
func validErrorDescription(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c > 0x7e || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}
