package exchange

// Token type identifiers of RFC 8693 §3.
const (
	TokenTypeAccessToken  = "urn:ietf:params:oauth:token-type:access_token"
	TokenTypeRefreshToken = "urn:ietf:params:oauth:token-type:refresh_token"
	TokenTypeIDToken      = "urn:ietf:params:oauth:token-type:id_token"
	TokenTypeJWT          = "urn:ietf:params:oauth:token-type:jwt"
	TokenTypeSAML1        = "urn:ietf:params:oauth:token-type:saml1"
	TokenTypeSAML2        = "urn:ietf:params:oauth:token-type:saml2"
	// TokenTypeSelfSigned and TokenTypeUnsignedJSON are the subject token
	// types of draft-ietf-oauth-transaction-tokens: a JWT signed by the
	// requesting workload itself, and a plain JSON object it asserts.
	TokenTypeSelfSigned   = "urn:ietf:params:oauth:token-type:self_signed"
	TokenTypeUnsignedJSON = "urn:ietf:params:oauth:token-type:unsigned_json"
)

// tokenTypeURNs maps the short names used in configuration to their URNs.
var tokenTypeURNs = map[string]string{
	"access_token":  TokenTypeAccessToken,
	"refresh_token": TokenTypeRefreshToken,
	"id_token":      TokenTypeIDToken,
	"jwt":           TokenTypeJWT,
	"saml1":         TokenTypeSAML1,
	"saml2":         TokenTypeSAML2,
	"txn_token":     TokenTypeTxnToken,
	"self_signed":   TokenTypeSelfSigned,
	"unsigned_json": TokenTypeUnsignedJSON,
}

// TokenTypeURN returns the RFC 8693 URN for a short name such as
// "access_token", or the argument itself when it already is a known URN.
func TokenTypeURN(name string) (string, bool) {
	if urn, ok := tokenTypeURNs[name]; ok {
		return urn, true
	}
	for _, urn := range tokenTypeURNs {
		if urn == name {
			return urn, true
		}
	}
	return "", false
}
