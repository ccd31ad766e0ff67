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
	"io/fs"
	"os"
	"slices"
	"time"
	"unsafe"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws/jwsbb"
)

// SigningAlgorithms are the algorithms the gateway can mint with.
var SigningAlgorithms = []string{"ES256", "ES384", "EdDSA", "RS256", "PS256"}

// DefaultSigningAlgorithm is what the gateway signs with unless told otherwise.
const DefaultSigningAlgorithm = "ES256"

// KeyStorage is the part of Caddy's storage (certmagic.Storage) the signer
// needs to share one key between restarts and instances.
type KeyStorage interface {
	Lock(ctx context.Context, name string) error
	Unlock(ctx context.Context, name string) error
	Load(ctx context.Context, key string) ([]byte, error)
	Store(ctx context.Context, key string, value []byte) error
}

// Signer signs minted tokens with the gateway's private key.
type Signer struct {
	alg     jwa.SignatureAlgorithm
	kid     string
	private crypto.Signer
	public  jwk.Set
	jwks    []byte
	// publishedKIDs are the other keys published beside it (sorted).
	publishedKIDs []string
	// since is when the key started signing (zero: unknown, a key file).
	since time.Time
	// accessTokenHeader and txnTokenHeader are the base64url protected
	// headers of the two token kinds this key signs, serialized once: the
	// header is the same for every token, so re-marshalling it per token
	// would only cost time.
	accessTokenHeader, txnTokenHeader string
}

// SigningSince is when the key started signing; zero for a key file.
func (s *Signer) SigningSince() time.Time { return s.since }

// CheckSigningAlgorithm tells whether the gateway can mint with alg.
func CheckSigningAlgorithm(alg string) error {
	if !slices.Contains(SigningAlgorithms, alg) {
		return fmt.Errorf("signing algorithm %q is not supported (supported: %v)", alg, SigningAlgorithms)
	}
	return nil
}

// GenerateSigningKey creates a new private key for alg, as a JWK with its
// RFC 7638 thumbprint as kid.
func GenerateSigningKey(alg string) (jwk.Key, error) {
	if err := CheckSigningAlgorithm(alg); err != nil {
		return nil, err
	}
	var raw any
	var err error
	switch alg {
	case "ES256":
		raw, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "ES384":
		raw, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case "EdDSA":
		_, raw, err = ed25519.GenerateKey(rand.Reader)
	case "RS256", "PS256":
		raw, err = rsa.GenerateKey(rand.Reader, 2048)
	}
	if err != nil {
		return nil, fmt.Errorf("generating %s key: %w", alg, err)
	}
	key, err := jwk.Import(raw)
	if err != nil {
		return nil, err
	}
	return key, nil
}

// NewSigner prepares a signer from a private JWK for alg.
func NewSigner(key jwk.Key, alg string) (*Signer, error) {
	if err := CheckSigningAlgorithm(alg); err != nil {
		return nil, err
	}
	var raw any
	if err := jwk.Export(key, &raw); err != nil {
		return nil, fmt.Errorf("signing key: %w", err)
	}
	signer, ok := raw.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("signing key is a %T, not a private key", raw)
	}
	if !keyFitsAlgorithm(signer.Public(), alg) {
		return nil, fmt.Errorf("signing key (%T) does not fit signing_alg %s", signer.Public(), alg)
	}
	if k, ok := signer.(*rsa.PrivateKey); ok {
		// A key built from a JWK or PEM has no precomputed values, and
		// crypto/rsa would derive them again on every signature (about
		// 15% of an RS256 mint).
		k.Precompute()
	}
	if a, ok := key.Algorithm(); ok && a.String() != alg {
		return nil, fmt.Errorf("signing key is for %s, not signing_alg %s", a, alg)
	}
	// The published key is built from the public key material alone, never
	// by copying the private JWK's members (a stray private or custom member
	// of a key file must not reach the JWKS).
	pub, err := jwk.Import(signer.Public())
	if err != nil {
		return nil, err
	}
	kid, ok := key.KeyID()
	if !ok || kid == "" {
		if err := jwk.AssignKeyID(pub); err != nil {
			return nil, err
		}
		kid, _ = pub.KeyID()
	}
	sigAlg, _ := jwa.LookupSignatureAlgorithm(alg)
	for _, set := range []struct {
		name string
		val  any
	}{{jwk.KeyIDKey, kid}, {jwk.AlgorithmKey, sigAlg}, {jwk.KeyUsageKey, "sig"}} {
		if err := pub.Set(set.name, set.val); err != nil {
			return nil, err
		}
	}
	public := jwk.NewSet()
	if err := public.AddKey(pub); err != nil {
		return nil, err
	}
	jwks, err := json.Marshal(public)
	if err != nil {
		return nil, err
	}
	return &Signer{alg: sigAlg, kid: kid, private: signer, public: public, jwks: jwks,
		accessTokenHeader: protectedHeader(sigAlg.String(), kid, "at+jwt"),
		txnTokenHeader:    protectedHeader(sigAlg.String(), kid, TxnTokenTyp)}, nil
}

// protectedHeader is the base64url JSON protected header {alg, kid, typ}.
func protectedHeader(alg, kid, typ string) string {
	b, _ := json.Marshal(struct {
		Alg string `json:"alg"`
		Kid string `json:"kid"`
		Typ string `json:"typ"`
	}{alg, kid, typ}) // three strings: cannot fail
	return base64.RawURLEncoding.EncodeToString(b)
}

// SignerFromFile loads a private key from a PEM or JWK file.
func SignerFromFile(path, alg string) (*Signer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading signing_key_file: %w", err)
	}
	key, err := jwk.ParseKey(data, jwk.WithPEM(isPEM(data)))
	if err != nil {
		return nil, fmt.Errorf("signing_key_file %s: %w", path, err)
	}
	s, err := NewSigner(key, alg)
	if err != nil {
		return nil, fmt.Errorf("signing_key_file %s: %w", path, err)
	}
	return s, nil
}

func isPEM(data []byte) bool {
	for _, b := range data {
		switch b {
		case ' ', '\t', '\r', '\n':
			continue
		}
		return b == '-'
	}
	return false
}

// signingKeyStorageKey is where a generated key lives in Caddy storage.
func signingKeyStorageKey(alg string) string {
	return "token_exchange/keys/" + alg + "/signing.jwk"
}

// LoadOrCreateSigner returns the signer kept in storage for alg, generating
// and storing one if there is none. It follows Caddy's distributed-STEK
// pattern: lock, load, generate and store only if absent, unlock, so every
// instance that shares the storage signs with the same key and kid.
func LoadOrCreateSigner(ctx context.Context, storage KeyStorage, alg string) (*Signer, error) {
	if err := CheckSigningAlgorithm(alg); err != nil {
		return nil, err
	}
	name := signingKeyStorageKey(alg)
	if err := storage.Lock(ctx, name); err != nil {
		return nil, fmt.Errorf("locking signing key in storage: %w", err)
	}
	defer func() { _ = storage.Unlock(context.WithoutCancel(ctx), name) }()

	data, err := storage.Load(ctx, name)
	switch {
	case err == nil:
		key, err := jwk.ParseKey(data)
		if err != nil {
			return nil, fmt.Errorf("signing key in storage at %s is corrupt: %w", name, err)
		}
		return NewSigner(key, alg)
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("loading signing key from storage: %w", err)
	}

	key, err := GenerateSigningKey(alg)
	if err != nil {
		return nil, err
	}
	if err := jwk.AssignKeyID(key); err != nil {
		return nil, err
	}
	data, err = json.Marshal(key)
	if err != nil {
		return nil, err
	}
	if err := storage.Store(ctx, name, data); err != nil {
		return nil, fmt.Errorf("storing signing key: %w", err)
	}
	return NewSigner(key, alg)
}

// Publishes tells whether kid is among the keys this signer's JWKS
// publishes (its own or one published beside it). Nil-safe.
func (s *Signer) Publishes(kid string) bool {
	if s == nil {
		return false
	}
	return kid == s.kid || slices.Contains(s.publishedKIDs, kid)
}

// Algorithm is the signing algorithm.
func (s *Signer) Algorithm() string { return s.alg.String() }

// KeyID is the kid of the signing key.
func (s *Signer) KeyID() string { return s.kid }

// PublicKeys is the JWKS of the public signing keys.
func (s *Signer) PublicKeys() jwk.Set { return s.public }

// JWKS is the public JWKS, serialized.
func (s *Signer) JWKS() []byte { return s.jwks }

// SignPayload signs a serialized claims set as an RFC 9068 access token
// (typ at+jwt, kid), as a compact JWS.
func (s *Signer) SignPayload(payload []byte) (string, error) {
	return s.signCompact(s.accessTokenHeader, payload)
}

// signCompact signs payload under an encoded protected header (one of the
// signer's own) as a compact JWS. The signature is jwx's (jwsbb.Sign, the
// same code jws.Sign ends in); only the three base64url segments are joined
// here, in one buffer.
func (s *Signer) signCompact(header string, payload []byte) (string, error) {
	enc := base64.RawURLEncoding
	buf := make([]byte, 0, len(header)+1+enc.EncodedLen(len(payload))+1+enc.EncodedLen(maxSignatureSize))
	buf = append(buf, header...)
	buf = append(buf, '.')
	buf = enc.AppendEncode(buf, payload)
	sig, err := jwsbb.Sign(s.private, s.alg.String(), buf, nil)
	if err != nil {
		return "", fmt.Errorf("signing minted token: %w", err)
	}
	buf = append(buf, '.')
	buf = enc.AppendEncode(buf, sig)
	// buf is complete and never written again: the string shares its bytes
	// (as strings.Builder does) instead of copying a token per mint.
	return unsafe.String(unsafe.SliceData(buf), len(buf)), nil
}

// maxSignatureSize is the largest signature of SigningAlgorithms: a
// 2048-bit RSA key's 256 bytes (ES384: 96, ES256: 64, EdDSA: 64). A larger
// key only costs one more allocation.
const maxSignatureSize = 256
