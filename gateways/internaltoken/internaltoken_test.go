package internaltoken_test

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/cloud-connector/cloud-connector/gateways/internaltoken"
)

const issuer = "https://cloud.example/ai"

var claims = internaltoken.Claims{
	Audience: "gitlab-ai-gateway", Subject: "inst-1", OrganizationID: "org-1",
	Realm: "self-managed", Feature: "complete_code", Plan: "premium",
}

type clock struct{ now atomic.Int64 }

func (c *clock) Now() time.Time          { return time.Unix(0, c.now.Load()) }
func (c *clock) Advance(d time.Duration) { c.now.Add(int64(d)) }

func keyFile(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "key.pem")
	if err := internaltoken.WriteKeyFile(path); err != nil {
		t.Fatal(err)
	}
	return path
}

func writePEM(t *testing.T, typ string, der []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func publishedKeys(t *testing.T, s *internaltoken.Signer) jwk.Set {
	t.Helper()
	set, err := jwk.Parse(s.JWKS())
	if err != nil {
		t.Fatalf("parse JWKS: %v", err)
	}
	return set
}

func newSigner(t *testing.T, cfg internaltoken.Config) (*internaltoken.Signer, *clock) {
	t.Helper()
	clk := &clock{}
	clk.now.Store(time.Now().UnixNano())
	if cfg.Issuer == "" {
		cfg.Issuer = issuer
	}
	if cfg.KeyFiles == nil {
		cfg.KeyFiles = []string{keyFile(t)}
	}
	cfg.Now = clk.Now
	s, err := internaltoken.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s, clk
}

// TestTokenVerifies signs a token and verifies it as a backend would,
// against the published key set only.
func TestTokenVerifies(t *testing.T) {
	t.Parallel()
	s, _ := newSigner(t, internaltoken.Config{})
	tok, err := s.Token(claims)
	if err != nil {
		t.Fatal(err)
	}
	keys := publishedKeys(t, s)
	got, err := internaltoken.Verify(tok, keys, issuer, claims.Audience)
	if err != nil {
		t.Fatal(err)
	}
	if got != claims {
		t.Fatalf("claims = %+v, want %+v", got, claims)
	}
	// The published set holds public keys only, marked for signatures.
	k, _ := keys.Key(0)
	if _, err := k.PublicKey(); err != nil || k.KeyUsage() != "sig" || k.KeyID() == "" || k.Algorithm() != jwa.ES256 {
		t.Fatalf("published key: use %q kid %q alg %q", k.KeyUsage(), k.KeyID(), k.Algorithm())
	}
	if strings.Contains(string(s.JWKS()), `"d"`) {
		t.Fatal("JWKS publishes private key material")
	}
	// Another audience or issuer is refused.
	if _, err := internaltoken.Verify(tok, keys, issuer, "gitlab-cicd"); err == nil {
		t.Fatal("token accepted for another audience")
	}
	if _, err := internaltoken.Verify(tok, keys, "https://other.example", claims.Audience); err == nil {
		t.Fatal("token accepted from another issuer")
	}
}

// TestTokenReusedForHalfItsLifetime checks the signing cache: identical
// claims share a token while it has more than half its lifetime left, and
// a token is never handed out past that.
func TestTokenReusedForHalfItsLifetime(t *testing.T) {
	t.Parallel()
	s, clk := newSigner(t, internaltoken.Config{TTL: time.Minute})
	first, err := s.Token(claims)
	if err != nil {
		t.Fatal(err)
	}
	clk.Advance(29 * time.Second)
	if again, _ := s.Token(claims); again != first {
		t.Fatal("token not reused within half its lifetime")
	}
	other := claims
	other.Feature = "duo_chat"
	if tok, _ := s.Token(other); tok == first {
		t.Fatal("token reused for other claims")
	}
	clk.Advance(2 * time.Second)
	if renewed, _ := s.Token(claims); renewed == first {
		t.Fatal("token reused past half its lifetime")
	}
}

// TestExpiredTokenRefused lets a token age past its lifetime (and the
// verifier's skew) and checks it no longer verifies.
func TestExpiredTokenRefused(t *testing.T) {
	t.Parallel()
	s, clk := newSigner(t, internaltoken.Config{TTL: 10 * time.Second})
	clk.Advance(-time.Minute) // issued a minute ago, for 10s
	tok, err := s.Token(claims)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := internaltoken.Verify(tok, publishedKeys(t, s), issuer, claims.Audience); err == nil {
		t.Fatal("expired token accepted")
	}
}

// TestKeyRotation configures two keys: both are published, the first
// signs, and a token signed by a key not published is refused.
func TestKeyRotation(t *testing.T) {
	t.Parallel()
	current, next := keyFile(t), keyFile(t)
	s, _ := newSigner(t, internaltoken.Config{KeyFiles: []string{current, next}})
	keys := publishedKeys(t, s)
	if keys.Len() != 2 {
		t.Fatalf("published %d keys, want 2", keys.Len())
	}
	swapped, _ := newSigner(t, internaltoken.Config{KeyFiles: []string{next, current}})
	tok, err := swapped.Token(claims)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := internaltoken.Verify(tok, keys, issuer, claims.Audience); err != nil {
		t.Fatalf("token of the second key refused by the published set: %v", err)
	}
	alone, _ := newSigner(t, internaltoken.Config{})
	foreign, err := alone.Token(claims)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := internaltoken.Verify(foreign, keys, issuer, claims.Audience); err == nil {
		t.Fatal("token of an unpublished key accepted")
	}
}

// TestKeyTypes checks each supported key type signs tokens that verify,
// with the algorithm its type implies.
func TestKeyTypes(t *testing.T) {
	t.Parallel()
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ecDER, err := x509.MarshalECPrivateKey(ecKey)
	if err != nil {
		t.Fatal(err)
	}
	edDER, err := x509.MarshalPKCS8PrivateKey(edKey)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		file string
		alg  jwa.SignatureAlgorithm
	}{
		{"RSA PKCS#1", writePEM(t, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(rsaKey)), jwa.RS256},
		{"EC SEC 1", writePEM(t, "EC PRIVATE KEY", ecDER), jwa.ES256},
		{"Ed25519 PKCS#8", writePEM(t, "PRIVATE KEY", edDER), jwa.EdDSA},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := newSigner(t, internaltoken.Config{KeyFiles: []string{tc.file}})
			tok, err := s.Token(claims)
			if err != nil {
				t.Fatal(err)
			}
			msg, err := jws.Parse([]byte(tok))
			if err != nil {
				t.Fatal(err)
			}
			if alg := msg.Signatures()[0].ProtectedHeaders().Algorithm(); alg != tc.alg {
				t.Fatalf("alg = %s, want %s", alg, tc.alg)
			}
			if _, err := internaltoken.Verify(tok, publishedKeys(t, s), issuer, claims.Audience); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestSignerStartsNoGoroutines: a Signer holds nothing that would need
// stopping (gateways build one per start, tests one per case).
func TestSignerStartsNoGoroutines(t *testing.T) {
	key := keyFile(t)
	before := runtime.NumGoroutine()
	for range 50 {
		if _, err := internaltoken.New(internaltoken.Config{Issuer: issuer, KeyFiles: []string{key}}); err != nil {
			t.Fatal(err)
		}
	}
	if after := runtime.NumGoroutine(); after > before+5 {
		t.Fatalf("goroutines %d -> %d after 50 signers", before, after)
	}
}

// TestBadConfig checks each refused configuration names its problem.
func TestBadConfig(t *testing.T) {
	t.Parallel()
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p384DER, _ := x509.MarshalECPrivateKey(p384)
	pubDER, _ := x509.MarshalPKIXPublicKey(&p384.PublicKey)
	notPEM := filepath.Join(t.TempDir(), "key.txt")
	os.WriteFile(notPEM, []byte("not a key"), 0o600)
	good := keyFile(t)
	for _, tc := range []struct {
		name string
		cfg  internaltoken.Config
		want string
	}{
		{"no issuer", internaltoken.Config{KeyFiles: []string{good}}, "issuer is required"},
		{"no keys", internaltoken.Config{Issuer: issuer}, "at least one key file"},
		{"missing file", internaltoken.Config{Issuer: issuer, KeyFiles: []string{filepath.Join(t.TempDir(), "nope")}}, "no such file"},
		{"not PEM", internaltoken.Config{Issuer: issuer, KeyFiles: []string{notPEM}}, "no PEM block"},
		{"public key", internaltoken.Config{Issuer: issuer, KeyFiles: []string{writePEM(t, "PUBLIC KEY", pubDER)}}, "not a private key"},
		{"small RSA", internaltoken.Config{Issuer: issuer, KeyFiles: []string{writePEM(t, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(small))}}, "at least 2048"},
		{"P-384", internaltoken.Config{Issuer: issuer, KeyFiles: []string{writePEM(t, "EC PRIVATE KEY", p384DER)}}, "only P-256"},
		{"same key twice", internaltoken.Config{Issuer: issuer, KeyFiles: []string{good, good}}, "configured twice"},
		{"ttl too short", internaltoken.Config{Issuer: issuer, KeyFiles: []string{good}, TTL: time.Second}, "out of range"},
		{"ttl negative", internaltoken.Config{Issuer: issuer, KeyFiles: []string{good}, TTL: -time.Minute}, "out of range"},
	} {
		if _, err := internaltoken.New(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want it to mention %q", tc.name, err, tc.want)
		}
	}
	s, _ := newSigner(t, internaltoken.Config{})
	if _, err := s.Token(internaltoken.Claims{Feature: "x"}); err == nil {
		t.Error("token without audience and subject signed")
	}
}

func BenchmarkToken(b *testing.B) {
	path := filepath.Join(b.TempDir(), "key.pem")
	if err := internaltoken.WriteKeyFile(path); err != nil {
		b.Fatal(err)
	}
	s, err := internaltoken.New(internaltoken.Config{Issuer: issuer, KeyFiles: []string{path}})
	if err != nil {
		b.Fatal(err)
	}
	b.Run("cached", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := s.Token(claims); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("sign", func(b *testing.B) {
		b.ReportAllocs()
		c := claims
		i := 0
		for b.Loop() {
			i++
			c.Subject = "inst-" + strconv.Itoa(i) // never cached: always signs
			if _, err := s.Token(c); err != nil {
				b.Fatal(err)
			}
		}
	})
}
