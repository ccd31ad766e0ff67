package exchange

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
)

// RFC 9701 JWT introspection responses, and private_key_jwt (RFC 7523)
// client authentication of the gateway at the issuer's introspection
// endpoint.

const (
	// IntrospectionJWTMediaType is the media type of an RFC 9701 response.
	IntrospectionJWTMediaType = "application/token-introspection+jwt"
	// introspectionJWTTyp is the JOSE typ of an RFC 9701 response (§5).
	introspectionJWTTyp = "token-introspection+jwt"
	// introspectionJWTMaxAge is how old (iat) a JWT response may be: it
	// answers the call just made.
	introspectionJWTMaxAge = time.Minute
	// introspectionAssertionLifetime is the exp of the gateway's client
	// assertion: one call.
	introspectionAssertionLifetime = time.Minute
)

// verifyIntrospectionJWT verifies an RFC 9701 response with the issuer's
// keys (the key source of its trust block, as for its tokens) and returns
// its token_introspection member, the RFC 7662 response. Any failure is the
// dependency's, never the token's: the caller answers 503.
func (in *introspector) verifyIntrospectionJWT(ctx context.Context, body []byte) (map[string]any, error) {
	raw := string(body)
	hdr, p64, _, err := splitJWS(raw)
	if err != nil {
		return nil, fmt.Errorf("the JWT response is not a compact JWS: %w", err)
	}
	if hdr.Alg == "" || CheckVerifyAlgorithm(hdr.Alg) != nil || !in.ti.algorithmAllowed(hdr.Alg) {
		return nil, fmt.Errorf("the JWT response's algorithm %q is not among the issuer's algorithms", hdr.Alg)
	}
	if !typMatches(hdr.Typ, introspectionJWTTyp) {
		return nil, fmt.Errorf("the JWT response's typ is %q, not %s", hdr.Typ, introspectionJWTTyp)
	}
	_, status, err := in.ti.keys.verifyJWS(ctx, hdr, raw)
	switch {
	case status == keysUnavailable:
		return nil, errors.New("the issuer's keys are unavailable to verify the JWT response")
	case status == keyUnknown:
		return nil, errors.New("no key of the issuer matches the JWT response's kid and algorithm")
	case err != nil:
		return nil, fmt.Errorf("the JWT response's signature does not verify: %w", err)
	}
	payload, err := base64.RawURLEncoding.Strict().DecodeString(p64)
	if err != nil {
		return nil, errors.New("the JWT response's payload is not base64url")
	}
	if err := checkStrictJSON(payload); err != nil {
		return nil, fmt.Errorf("the JWT response's payload is not strict JSON: %w", err)
	}
	claims, err := decodeJSONObject(payload)
	if err != nil {
		return nil, errors.New("the JWT response's payload is not a JSON object")
	}
	if iss, err := stringClaim(claims, "iss"); err != nil || iss != in.ti.cfg.Issuer {
		return nil, errors.New("the JWT response's iss is not the issuer")
	}
	aud, err := audienceClaim(claims)
	if err != nil || !containsString(aud, in.cfg.ClientID) {
		return nil, errors.New("the JWT response's aud does not name the gateway's introspection client_id")
	}
	now := in.ts.now().Truncate(time.Second)
	skew := in.ts.clockSkew
	iat, ok, err := numericDate(claims, "iat")
	switch {
	case err != nil || !ok:
		return nil, errors.New("the JWT response has no valid iat")
	case now.Add(skew).Before(iat.Truncate(time.Second)):
		return nil, errors.New("the JWT response was issued in the future (iat)")
	case iat.Before(now.Add(-introspectionJWTMaxAge - skew)):
		return nil, fmt.Errorf("the JWT response's iat lies more than %s in the past", introspectionJWTMaxAge)
	}
	if exp, ok, err := numericDate(claims, "exp"); err != nil || (ok && !now.Before(exp.Truncate(time.Second).Add(skew))) {
		return nil, errors.New("the JWT response is expired")
	}
	ti, ok := claims["token_introspection"].(map[string]any)
	if !ok {
		return nil, errors.New("the JWT response has no token_introspection object")
	}
	return ti, nil
}

// assertionSigner signs the gateway's RFC 7523 client assertions.
type assertionSigner struct {
	alg  jwa.SignatureAlgorithm
	kid  string
	priv crypto.Signer
}

// loadAssertionKey reads the gateway's private key at the issuer (a JWK or
// PEM file). The algorithm is the JWK's alg, else the one its type implies
// (RSA: RS256, P-256: ES256, P-384: ES384, Ed25519: EdDSA). The kid is the
// JWK's, else its RFC 7638 thumbprint.
func loadAssertionKey(path string) (*assertionSigner, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("introspection_key_file: %w", err)
	}
	key, err := jwk.ParseKey(data, jwk.WithPEM(isPEM(data)))
	if err != nil {
		return nil, fmt.Errorf("introspection_key_file %s: not a private JWK or PEM key: %w", path, err)
	}
	var raw any
	if err := jwk.Export(key, &raw); err != nil {
		return nil, fmt.Errorf("introspection_key_file %s: %w", path, err)
	}
	priv, ok := raw.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("introspection_key_file %s: holds a %T, not a private key", path, raw)
	}
	var alg string
	if a, ok := key.Algorithm(); ok {
		alg = a.String()
	} else {
		switch p := priv.Public().(type) {
		case *rsa.PublicKey:
			alg = "RS256"
		case *ecdsa.PublicKey:
			switch p.Curve {
			case elliptic.P256():
				alg = "ES256"
			case elliptic.P384():
				alg = "ES384"
			}
		case ed25519.PublicKey:
			alg = "EdDSA"
		}
	}
	if alg == "" || CheckVerifyAlgorithm(alg) != nil || !keyFitsAlgorithm(priv.Public(), alg) {
		return nil, fmt.Errorf("introspection_key_file %s: a %T key cannot sign with %q (RSA of at least 2048 bits, P-256, P-384 or Ed25519)", path, priv.Public(), alg)
	}
	if k, ok := priv.(*rsa.PrivateKey); ok {
		k.Precompute() // or crypto/rsa derives the CRT values again per signature
	}
	sigAlg, _ := jwa.LookupSignatureAlgorithm(alg)
	kid, _ := key.KeyID()
	if kid == "" {
		pub, err := jwk.Import(priv.Public())
		if err != nil {
			return nil, err
		}
		if kid, err = thumbprint(pub); err != nil {
			return nil, err
		}
	}
	return &assertionSigner{alg: sigAlg, kid: kid, priv: priv}, nil
}

// sign makes one client assertion (RFC 7523 §3): iss = sub = clientID, aud =
// the endpoint it is sent to, a short exp, iat and a unique jti.
func (s *assertionSigner) sign(clientID, audience string, now time.Time) (string, error) {
	jti := make([]byte, 16)
	if _, err := rand.Read(jti); err != nil {
		return "", err
	}
	payload, err := json.Marshal(map[string]any{
		"iss": clientID, "sub": clientID, "aud": audience,
		"iat": now.Unix(), "exp": now.Add(introspectionAssertionLifetime).Unix(),
		"jti": base64.RawURLEncoding.EncodeToString(jti),
	})
	if err != nil {
		return "", err
	}
	hdr := jws.NewHeaders()
	if err := hdr.Set(jws.KeyIDKey, s.kid); err != nil {
		return "", err
	}
	if err := hdr.Set(jws.TypeKey, "JWT"); err != nil {
		return "", err
	}
	b, err := jws.Sign(payload, jws.WithKey(s.alg, s.priv, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		return "", fmt.Errorf("signing the client assertion: %w", err)
	}
	return string(b), nil
}
