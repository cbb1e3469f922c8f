// Package internaltoken signs the short-lived tokens a gateway hands its
// backends with each authorized request, so a backend can check that a
// request came through a gateway and read who it is for, instead of
// trusting plain headers anyone inside the network could set.
//
// A token is a JWT (ES256 for EC P-256 keys, RS256 for RSA, EdDSA for
// Ed25519) with the claims of Claims plus iss, aud, iat, nbf, exp and jti.
// Backends verify it against the gateway's published key set (JWKS): every
// configured key is published, the first one signs, so keys rotate by
// adding the new key second, waiting for backends to refetch, then moving it
// first, then removing the old one.
package internaltoken

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/google/uuid"
	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
	"github.com/lestrrat-go/jwx/v2/jwt"
)

// Header is the request header that carries the token to the backend.
const Header = "X-Cloud-Connector-Token"

// Config configures a Signer.
type Config struct {
	// Issuer is the iss claim, naming the gateway (e.g.
	// "https://cloud.gitlab.com/ai"). Required.
	Issuer string
	// KeyFiles are PEM private keys (PKCS#8, PKCS#1 or SEC 1). The first
	// signs; all are published. Required.
	KeyFiles []string
	// TTL is a token's lifetime. Default 5m. A token is reused for
	// requests with the same claims for half of it, so a backend always
	// gets one valid for at least TTL/2.
	TTL time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// Claims say who a request is for. Subject is the GitLab instance id.
type Claims struct {
	Audience       string // the backend's audience, e.g. "gitlab-ai-gateway"
	Subject        string // GitLab instance id
	OrganizationID string
	Realm          string // gitlab_realm: saas or self-managed
	Feature        string // unit primitive authorized
	Plan           string
}

// Signer signs internal tokens, reusing a token for identical claims while
// it has more than half its lifetime left. It is safe for concurrent use.
type Signer struct {
	issuer string
	ttl    time.Duration
	now    func() time.Time
	alg    jwa.SignatureAlgorithm
	key    jwk.Key // signing key, with kid and alg set
	jwks   []byte  // public keys, served to backends
	cache  *lru.Cache[Claims, issued]
}

type issued struct {
	token   string
	renewAt time.Time
}

// New loads the configured keys.
func New(cfg Config) (*Signer, error) {
	if cfg.Issuer == "" {
		return nil, errors.New("internal token: issuer is required")
	}
	if len(cfg.KeyFiles) == 0 {
		return nil, errors.New("internal token: at least one key file is required")
	}
	if cfg.TTL == 0 {
		cfg.TTL = 5 * time.Minute
	}
	if cfg.TTL < 10*time.Second || cfg.TTL > time.Hour {
		return nil, fmt.Errorf("internal token: ttl %s out of range [10s, 1h]", cfg.TTL)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	// Bounded, so a flood of distinct subjects cannot grow memory without
	// limit; Token checks an entry's age itself. (Not the expirable LRU:
	// it runs a goroutine per cache that nothing can stop.)
	cache, err := lru.New[Claims, issued](100_000)
	if err != nil {
		return nil, fmt.Errorf("internal token: %w", err)
	}
	s := &Signer{issuer: cfg.Issuer, ttl: cfg.TTL, now: cfg.Now, cache: cache}
	key, alg, public, err := loadKeys(cfg.KeyFiles)
	if err != nil {
		return nil, err
	}
	s.key, s.alg = key, alg
	b, err := json.Marshal(public)
	if err != nil {
		return nil, fmt.Errorf("internal token: encode key set: %w", err)
	}
	s.jwks = b
	return s, nil
}

// loadKeys reads the key files: the first is the signing key (with kid and
// alg set), and the public set holds every key's public part.
func loadKeys(files []string) (jwk.Key, jwa.SignatureAlgorithm, jwk.Set, error) {
	var (
		signing jwk.Key
		alg     jwa.SignatureAlgorithm
		public  = jwk.NewSet()
	)
	for i, path := range files {
		priv, a, err := readKey(path)
		if err != nil {
			return nil, "", nil, fmt.Errorf("internal token: key %s: %w", path, err)
		}
		k, err := jwk.FromRaw(priv)
		if err == nil {
			err = jwk.AssignKeyID(k)
		}
		if err == nil {
			err = k.Set(jwk.AlgorithmKey, a)
		}
		var pub jwk.Key
		if err == nil {
			pub, err = k.PublicKey()
		}
		if err == nil {
			err = pub.Set(jwk.KeyUsageKey, jwk.ForSignature)
		}
		if err != nil {
			return nil, "", nil, fmt.Errorf("internal token: key %s: %w", path, err)
		}
		if _, dup := public.LookupKeyID(pub.KeyID()); dup {
			return nil, "", nil, fmt.Errorf("internal token: key %s is configured twice", path)
		}
		if err := public.AddKey(pub); err != nil {
			return nil, "", nil, fmt.Errorf("internal token: key %s: %w", path, err)
		}
		if i == 0 {
			signing, alg = k, a
		}
	}
	return signing, alg, public, nil
}

// PublicKeys returns the key set a gateway configured with files publishes,
// for a backend (or a test) that has the key files at hand rather than the
// gateway's JWKS URL.
func PublicKeys(files ...string) (jwk.Set, error) {
	if len(files) == 0 {
		return nil, errors.New("internal token: at least one key file is required")
	}
	_, _, public, err := loadKeys(files)
	return public, err
}

// JWKS returns the published key set as JSON.
func (s *Signer) JWKS() []byte { return s.jwks }

// Token returns a token for c, signing a new one when none for the same
// claims has more than half its lifetime left.
func (s *Signer) Token(c Claims) (string, error) {
	now := s.now()
	if t, ok := s.cache.Get(c); ok && now.Before(t.renewAt) {
		return t.token, nil
	}
	tok, err := s.sign(c, now)
	if err != nil {
		return "", err
	}
	s.cache.Add(c, issued{token: tok, renewAt: now.Add(s.ttl / 2)})
	return tok, nil
}

func (s *Signer) sign(c Claims, now time.Time) (string, error) {
	if c.Audience == "" || c.Subject == "" {
		return "", errors.New("internal token: audience and subject are required")
	}
	now = now.Truncate(time.Second)
	b := jwt.NewBuilder().
		Issuer(s.issuer).
		Audience([]string{c.Audience}).
		Subject(c.Subject).
		IssuedAt(now).
		NotBefore(now.Add(-5*time.Second)).
		Expiration(now.Add(s.ttl)).
		JwtID(uuid.NewString()).
		Claim("gitlab_realm", c.Realm).
		Claim("organization_id", c.OrganizationID).
		Claim("feature", c.Feature).
		Claim("scopes", []string{c.Feature}).
		Claim("plan", c.Plan)
	t, err := b.Build()
	if err != nil {
		return "", fmt.Errorf("internal token: build: %w", err)
	}
	signed, err := jwt.Sign(t, jwt.WithKey(s.alg, s.key))
	if err != nil {
		return "", fmt.Errorf("internal token: sign: %w", err)
	}
	return string(signed), nil
}

// readKey reads a PEM private key and names the algorithm it signs with.
func readKey(path string) (crypto.Signer, jwa.SignatureAlgorithm, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, "", err
	}
	block, _ := pem.Decode(b)
	if block == nil {
		return nil, "", errors.New("no PEM block")
	}
	var key any
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	default:
		return nil, "", fmt.Errorf("PEM block %q is not a private key", block.Type)
	}
	if err != nil {
		return nil, "", err
	}
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		if k.Curve != elliptic.P256() {
			return nil, "", fmt.Errorf("EC curve %s: only P-256 (ES256) is supported", k.Curve.Params().Name)
		}
		return k, jwa.ES256, nil
	case *rsa.PrivateKey:
		if k.N.BitLen() < 2048 {
			return nil, "", fmt.Errorf("RSA key of %d bits: at least 2048 needed", k.N.BitLen())
		}
		return k, jwa.RS256, nil
	case ed25519.PrivateKey:
		return k, jwa.EdDSA, nil
	default:
		return nil, "", fmt.Errorf("unsupported key type %T", key)
	}
}

// WriteKeyFile generates an EC P-256 private key and writes it to path as
// PKCS#8 PEM, readable by the owner only. It is what the local stack and
// tests use; in production the key comes from a secret store (see
// deploy/README.md).
func WriteKeyFile(path string) error {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("generate key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return fmt.Errorf("encode key: %w", err)
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return fmt.Errorf("write key: %w", err)
	}
	return nil
}

// Verify checks an internal token the way a backend written in Go would:
// signed by a key in keys (the gateway's JWKS) with the key's algorithm,
// from issuer, for audience, and within its lifetime (30s of clock skew
// allowed). It returns the token's claims.
func Verify(raw string, keys jwk.Set, issuer, audience string) (Claims, error) {
	t, err := jwt.Parse([]byte(raw),
		jwt.WithKeySet(keys, jws.WithRequireKid(true), jws.WithInferAlgorithmFromKey(false)),
		jwt.WithIssuer(issuer),
		jwt.WithAudience(audience),
		jwt.WithAcceptableSkew(30*time.Second),
		jwt.WithRequiredClaim(jwt.ExpirationKey),
		jwt.WithRequiredClaim(jwt.SubjectKey),
	)
	if err != nil {
		return Claims{}, fmt.Errorf("internal token: %w", err)
	}
	c := Claims{Audience: audience, Subject: t.Subject()}
	for name, dst := range map[string]*string{
		"organization_id": &c.OrganizationID, "gitlab_realm": &c.Realm, "feature": &c.Feature, "plan": &c.Plan,
	} {
		if v, ok := t.Get(name); ok {
			*dst, _ = v.(string)
		}
	}
	return c, nil
}
