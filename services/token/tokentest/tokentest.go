// Package tokentest is a real OIDC token issuer for tests and local
// development. It generates RSA keys, serves a discovery document and a JWKS
// over HTTP the way GitLab's issuers do, and mints GitLab-shaped instance
// tokens. Production code never imports it.
package tokentest

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"github.com/lestrrat-go/jwx/v2/jwt"
)

// JWKSPath is where the issuer publishes its keys, as GitLab does.
const JWKSPath = "/oauth/discovery/keys"

// Issuer mints instance tokens and publishes the keys that verify them.
// It is safe for concurrent use.
type Issuer struct {
	url string

	mu        sync.Mutex
	signing   jwk.Key   // private key used by Mint
	published []jwk.Key // public keys served at JWKSPath
	fetches   int
}

// New returns an issuer whose iss claim and discovery document use url, with
// one freshly generated RSA-2048 signing key.
func New(url string) (*Issuer, error) {
	i := &Issuer{url: strings.TrimSuffix(url, "/")}
	if err := i.Rotate(); err != nil {
		return nil, err
	}
	return i, nil
}

// Start serves a new issuer on a loopback httptest server that is closed when
// the test ends.
func Start(tb testing.TB) *Issuer {
	tb.Helper()
	var i *Issuer
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i.Handler().ServeHTTP(w, r)
	}))
	tb.Cleanup(srv.Close)
	var err error
	if i, err = New(srv.URL); err != nil {
		tb.Fatalf("tokentest: %v", err)
	}
	return i
}

// URL is the issuer identifier (the iss claim).
func (i *Issuer) URL() string { return i.url }

// Rotate generates a new signing key and publishes it beside the old ones,
// as GitLab does before swapping signing keys.
func (i *Issuer) Rotate() error {
	priv, err := GenerateKey()
	if err != nil {
		return err
	}
	pub, err := priv.PublicKey()
	if err != nil {
		return fmt.Errorf("public key: %w", err)
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	i.signing = priv
	i.published = append(i.published, pub)
	return nil
}

// Retire stops publishing every key but the current signing key.
func (i *Issuer) Retire() {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.published = i.published[len(i.published)-1:]
}

// Fetches reports how many times the JWKS has been served.
func (i *Issuer) Fetches() int {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.fetches
}

// Handler serves /.well-known/openid-configuration and the JWKS.
func (i *Issuer) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{
			"issuer":                                i.url,
			"jwks_uri":                              i.url + JWKSPath,
			"id_token_signing_alg_values_supported": []string{"RS256"},
			"response_types_supported":              []string{"id_token"},
			"subject_types_supported":               []string{"public"},
		})
	})
	mux.HandleFunc("GET "+JWKSPath, func(w http.ResponseWriter, r *http.Request) {
		i.mu.Lock()
		set := jwk.NewSet()
		for _, k := range i.published {
			set.AddKey(k)
		}
		i.fetches++
		i.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "max-age=86400")
		json.NewEncoder(w).Encode(set)
	})
	return mux
}

// Claims describe a token to mint. Zero fields take GitLab-like defaults.
type Claims struct {
	Subject  string   // instance id
	Audience []string // default ["gitlab-ai-gateway"]
	Realm    string   // gitlab_realm; default "self-managed"
	Scopes   []string
	// IssuedAt defaults to now; nbf is IssuedAt-5s, as GitLab sets it.
	IssuedAt time.Time
	// TTL is the lifetime; default 1h.
	TTL time.Duration
	// Issuer overrides iss (for tests of untrusted issuers).
	Issuer string
	// Extra claims, merged last.
	Extra map[string]any
}

// Mint returns a signed compact JWT for c.
func (i *Issuer) Mint(c Claims) (string, error) {
	i.mu.Lock()
	key := i.signing
	i.mu.Unlock()
	return i.MintWith(key, c, nil)
}

// MintWith signs c with key (which may be a key the issuer does not publish)
// and the given extra protected headers. A nil headers keeps the key's kid.
func (i *Issuer) MintWith(key jwk.Key, c Claims, headers jws.Headers) (string, error) {
	tok, err := i.build(c)
	if err != nil {
		return "", err
	}
	var opts []jwt.Option
	if headers != nil {
		opts = append(opts, jws.WithProtectedHeaders(headers))
	}
	signed, err := jwt.Sign(tok, jwt.WithKey(jwa.RS256, key, opts...))
	if err != nil {
		return "", fmt.Errorf("sign token: %w", err)
	}
	return string(signed), nil
}

// SignRaw signs an arbitrary payload with the current key and headers, for
// tests that need tokens Mint would never produce.
func (i *Issuer) SignRaw(payload []byte, alg jwa.SignatureAlgorithm, key any, headers jws.Headers) (string, error) {
	if key == nil {
		i.mu.Lock()
		key = i.signing
		i.mu.Unlock()
	}
	opts := []jws.WithKeySuboption{}
	if headers != nil {
		opts = append(opts, jws.WithProtectedHeaders(headers))
	}
	out, err := jws.Sign(payload, jws.WithKey(alg, key, opts...))
	if err != nil {
		return "", fmt.Errorf("sign payload: %w", err)
	}
	return string(out), nil
}

func (i *Issuer) build(c Claims) (jwt.Token, error) {
	now := c.IssuedAt
	if now.IsZero() {
		now = time.Now()
	}
	if c.TTL == 0 {
		c.TTL = time.Hour
	}
	if c.Audience == nil {
		c.Audience = []string{"gitlab-ai-gateway"}
	}
	if c.Realm == "" {
		c.Realm = "self-managed"
	}
	if c.Issuer == "" {
		c.Issuer = i.url
	}
	b := jwt.NewBuilder().
		Issuer(c.Issuer).
		Subject(c.Subject).
		Audience(c.Audience).
		IssuedAt(now).
		NotBefore(now.Add(-5*time.Second)).
		Expiration(now.Add(c.TTL)).
		JwtID(uuid.NewString()).
		Claim("gitlab_realm", c.Realm).
		Claim("scopes", c.Scopes)
	for k, v := range c.Extra {
		b = b.Claim(k, v)
	}
	tok, err := b.Build()
	if err != nil {
		return nil, fmt.Errorf("build token: %w", err)
	}
	return tok, nil
}

// GenerateKey returns a new RSA-2048 private JWK with alg RS256, use sig and
// kid set to its RFC 7638 thumbprint, as GitLab's keys are.
func GenerateKey() (jwk.Key, error) {
	raw, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, fmt.Errorf("generate rsa key: %w", err)
	}
	key, err := jwk.FromRaw(raw)
	if err != nil {
		return nil, fmt.Errorf("jwk from rsa key: %w", err)
	}
	tp, err := key.Thumbprint(crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("thumbprint: %w", err)
	}
	key.Set(jwk.KeyIDKey, base64.RawURLEncoding.EncodeToString(tp))
	key.Set(jwk.AlgorithmKey, jwa.RS256)
	key.Set(jwk.KeyUsageKey, jwk.ForSignature)
	return key, nil
}
