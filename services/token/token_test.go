package token_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/cloud-connector/cloud-connector/services/server/servertest"
	"github.com/cloud-connector/cloud-connector/services/token"
	"github.com/cloud-connector/cloud-connector/services/token/tokentest"
)

const aud = "gitlab-ai-gateway"

type fixture struct {
	issuer   *tokentest.Issuer
	verifier *token.Verifier
	clock    *clock
}

type clock struct{ now atomic.Int64 }

func (c *clock) Now() time.Time          { return time.Unix(0, c.now.Load()) }
func (c *clock) Advance(d time.Duration) { c.now.Add(int64(d)) }

func setup(t testing.TB, mutate ...func(*token.Config)) fixture {
	t.Helper()
	iss := tokentest.Start(t)
	clk := &clock{}
	clk.now.Store(time.Now().UnixNano())
	cfg := token.Config{
		Issuers: []token.IssuerConfig{{Issuer: iss.URL(), Audiences: []string{aud, "gitlab-cicd"}}},
		Now:     clk.Now,
	}
	for _, m := range mutate {
		m(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	v, err := token.New(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatalf("token.New: %v", err)
	}
	return fixture{issuer: iss, verifier: v, clock: clk}
}

func mint(t testing.TB, iss *tokentest.Issuer, c tokentest.Claims) string {
	t.Helper()
	if c.Subject == "" {
		c.Subject = "instance-1"
	}
	s, err := iss.Mint(c)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestVerifyValid(t *testing.T) {
	t.Parallel()
	f := setup(t)
	raw := mint(t, f.issuer, tokentest.Claims{Subject: "inst-42", Realm: "saas", Scopes: []string{"complete_code", "duo_chat"},
		Extra: map[string]any{"gitlab_instance_id": "inst-42"}})
	c, err := f.verifier.Verify(context.Background(), raw, aud)
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if c.Subject != "inst-42" || c.Realm != "saas" || c.InstanceID != "inst-42" || c.Issuer != f.issuer.URL() {
		t.Errorf("claims = %+v", c)
	}
	if strings.Join(c.Scopes, ",") != "complete_code,duo_chat" {
		t.Errorf("scopes = %v", c.Scopes)
	}
	if c.All["gitlab_realm"] != "saas" || c.Expiry.IsZero() || c.ID == "" {
		t.Errorf("all claims = %v, exp %v, jti %q", c.All, c.Expiry, c.ID)
	}
}

func TestVerifyRefusals(t *testing.T) {
	t.Parallel()
	f := setup(t)
	foreign, err := tokentest.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	knownKid := fetchJWKS(t, f.issuer)[0]
	// A foreign key that claims the kid of a published key: a forged signature.
	impostor, _ := tokentest.GenerateKey()
	impostor.Set(jwk.KeyIDKey, knownKid)
	kidless, _ := tokentest.GenerateKey()
	kidless.Remove(jwk.KeyIDKey)
	validPayload := func() []byte {
		b, _ := json.Marshal(map[string]any{"iss": f.issuer.URL(), "sub": "i", "aud": []string{aud},
			"exp": time.Now().Add(time.Hour).Unix(), "iat": time.Now().Unix()})
		return b
	}
	hs256, err := f.issuer.SignRaw(validPayload(), jwa.HS256, []byte("0123456789abcdef0123456789abcdef"), kidHeader(knownKid))
	if err != nil {
		t.Fatal(err)
	}
	noneHeader := base64URL(`{"alg":"none","kid":"` + knownKid + `"}`)
	noneToken := noneHeader + "." + base64URL(string(validPayload())) + "."
	noExp, _ := json.Marshal(map[string]any{"iss": f.issuer.URL(), "sub": "i", "aud": []string{aud}})
	noExpToken, err := f.issuer.SignRaw(noExp, jwa.RS256, nil, kidHeader(knownKid))
	if err != nil {
		t.Fatal(err)
	}
	noSub, _ := json.Marshal(map[string]any{"iss": f.issuer.URL(), "aud": []string{aud}, "exp": time.Now().Add(time.Hour).Unix()})
	noSubToken, _ := f.issuer.SignRaw(noSub, jwa.RS256, nil, kidHeader(knownKid))

	now := time.Now()
	tests := []struct {
		name     string
		raw      string
		audience string
		want     token.Reason
	}{
		{"empty", "", aud, token.ReasonMalformed},
		{"garbage", "not a token", aud, token.ReasonMalformed},
		{"two segments", "abc.def", aud, token.ReasonMalformed},
		{"bad base64 json", "abc.def.ghi", aud, token.ReasonMalformed},
		{"too long", strings.Repeat("a", token.MaxTokenBytes) + ".b.c", aud, token.ReasonMalformed},
		{"expired", mint(t, f.issuer, tokentest.Claims{IssuedAt: now.Add(-2 * time.Hour), TTL: time.Hour}), aud, token.ReasonExpired},
		{"not yet valid", mint(t, f.issuer, tokentest.Claims{IssuedAt: now.Add(10 * time.Minute)}), aud, token.ReasonNotYetValid},
		{"wrong audience", mint(t, f.issuer, tokentest.Claims{Audience: []string{"other"}}), aud, token.ReasonAudience},
		{"audience issuer is not trusted for", mint(t, f.issuer, tokentest.Claims{Audience: []string{"gitlab-other"}}), "gitlab-other", token.ReasonAudience},
		{"untrusted issuer", mint(t, f.issuer, tokentest.Claims{Issuer: "https://evil.example"}), aud, token.ReasonUnknownIssuer},
		{"missing kid", mustMintWith(t, f.issuer, kidless, nil), aud, token.ReasonMissingKeyID},
		{"unknown kid", mustMintWith(t, f.issuer, foreign, nil), aud, token.ReasonUnknownKey},
		{"forged signature with known kid", mustMintWith(t, f.issuer, impostor, nil), aud, token.ReasonSignature},
		{"HS256 with a shared secret", hs256, aud, token.ReasonAlgorithm},
		{"alg none", noneToken, aud, token.ReasonAlgorithm},
		{"no exp", noExpToken, aud, token.ReasonMissingClaim},
		{"no sub", noSubToken, aud, token.ReasonMissingClaim},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := f.verifier.Verify(context.Background(), tt.raw, tt.audience)
			if got := token.ReasonOf(err); got != tt.want {
				t.Fatalf("reason = %q (%v), want %q", got, err, tt.want)
			}
		})
	}
}

func TestVerifyClockSkew(t *testing.T) {
	t.Parallel()
	f := setup(t, func(c *token.Config) { c.ClockSkew = time.Minute })
	// Issued 30s in the future (issuer clock ahead): within skew.
	raw := mint(t, f.issuer, tokentest.Claims{IssuedAt: time.Now().Add(30 * time.Second)})
	if _, err := f.verifier.Verify(context.Background(), raw, aud); err != nil {
		t.Fatalf("token within skew refused: %v", err)
	}
	// Expired 30s ago: within skew.
	raw = mint(t, f.issuer, tokentest.Claims{IssuedAt: time.Now().Add(-time.Hour - 30*time.Second), TTL: time.Hour})
	if _, err := f.verifier.Verify(context.Background(), raw, aud); err != nil {
		t.Fatalf("token expired within skew refused: %v", err)
	}
}

// TestKeyRotation follows GitLab's rotation: a new key is published, tokens
// signed with it verify after one refetch, and a flood of unknown kids
// triggers at most one refetch per interval.
func TestKeyRotation(t *testing.T) {
	t.Parallel()
	f := setup(t, func(c *token.Config) { c.UnknownKeyRefetchInterval = time.Hour })
	ctx := context.Background()
	if _, err := f.verifier.Verify(ctx, mint(t, f.issuer, tokentest.Claims{}), aud); err != nil {
		t.Fatal(err)
	}
	before := f.issuer.Fetches()
	if err := f.issuer.Rotate(); err != nil {
		t.Fatal(err)
	}
	rotated := mint(t, f.issuer, tokentest.Claims{})
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := f.verifier.Verify(ctx, rotated, aud)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	ok := 0
	for err := range errs {
		if err == nil {
			ok++
		}
	}
	if ok == 0 {
		t.Fatal("no verification succeeded after rotation")
	}
	if got := f.issuer.Fetches() - before; got != 1 {
		t.Fatalf("JWKS fetched %d times for one rotation, want 1", got)
	}
	foreign, _ := tokentest.GenerateKey()
	for range 5 {
		if _, err := f.verifier.Verify(ctx, mustMintWith(t, f.issuer, foreign, nil), aud); token.ReasonOf(err) != token.ReasonUnknownKey {
			t.Fatalf("unknown kid: %v", err)
		}
	}
	if got := f.issuer.Fetches() - before; got != 1 {
		t.Fatalf("unknown kids caused %d refetches within the interval, want none beyond the rotation's", got-1)
	}
}

func TestStaleKeysFailClosed(t *testing.T) {
	t.Parallel()
	f := setup(t, func(c *token.Config) { c.MaxKeyStaleness = time.Hour })
	ctx := context.Background()
	if _, err := f.verifier.Verify(ctx, mint(t, f.issuer, tokentest.Claims{}), aud); err != nil {
		t.Fatal(err)
	}
	// The issuer has been unreachable longer than we trust its last keys.
	f.clock.Advance(2 * time.Hour)
	raw := mint(t, f.issuer, tokentest.Claims{IssuedAt: f.clock.Now()})
	_, err := f.verifier.Verify(ctx, raw, aud)
	var te *token.Error
	if token.ReasonOf(err) != token.ReasonKeysUnavailable || !errors.As(err, &te) || !te.Temporary() {
		t.Fatalf("err = %v, want temporary keys_unavailable", err)
	}
}

func TestUnreachableIssuer(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(nil)
	url := srv.URL
	srv.Close()
	v, err := token.New(context.Background(), token.Config{
		Issuers: []token.IssuerConfig{{Issuer: url, Audiences: []string{aud}}},
	}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Warm(context.Background()); err == nil {
		t.Fatal("Warm succeeded against a closed server")
	}
	iss, _ := tokentest.New(url)
	raw, _ := iss.Mint(tokentest.Claims{Subject: "i"})
	if _, err := v.Verify(context.Background(), raw, aud); token.ReasonOf(err) != token.ReasonKeysUnavailable {
		t.Fatalf("err = %v, want keys_unavailable", err)
	}
}

func TestStaticJWKSFile(t *testing.T) {
	t.Parallel()
	iss, err := tokentest.New("https://customers.example")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "jwks.json")
	rec := httptest.NewRecorder()
	iss.Handler().ServeHTTP(rec, httptest.NewRequest("GET", tokentest.JWKSPath, nil))
	if err := os.WriteFile(path, rec.Body.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	v, err := token.New(context.Background(), token.Config{
		Issuers: []token.IssuerConfig{{Issuer: iss.URL(), JWKSFile: path, Audiences: []string{aud}}},
	}, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := iss.Mint(tokentest.Claims{Subject: "i"})
	if _, err := v.Verify(context.Background(), raw, aud); err != nil {
		t.Fatalf("Verify with static JWKS: %v", err)
	}
}

func TestExplicitJWKSURL(t *testing.T) {
	t.Parallel()
	iss := tokentest.Start(t)
	v, err := token.New(context.Background(), token.Config{
		Issuers: []token.IssuerConfig{{Issuer: iss.URL(), JWKSURL: iss.URL() + tokentest.JWKSPath, Audiences: []string{aud}}},
	}, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := iss.Mint(tokentest.Claims{Subject: "i"})
	if _, err := v.Verify(context.Background(), raw, aud); err != nil {
		t.Fatalf("Verify with explicit JWKS URL: %v", err)
	}
}

func TestConfigValidation(t *testing.T) {
	t.Parallel()
	bad := []token.Config{
		{},
		{Issuers: []token.IssuerConfig{{Issuer: "https://a"}}},
		{Issuers: []token.IssuerConfig{{Issuer: "https://a", Audiences: []string{"x"}}, {Issuer: "https://a", Audiences: []string{"x"}}}},
		{Issuers: []token.IssuerConfig{{Issuer: "https://a", Audiences: []string{"x"}}}, Algorithms: []string{"HS256"}},
		{Issuers: []token.IssuerConfig{{Issuer: "https://a", Audiences: []string{"x"}}}, Algorithms: []string{"none"}},
		{Issuers: []token.IssuerConfig{{Issuer: "https://a", Audiences: []string{"x"}, JWKSURL: "u", JWKSFile: "f"}}},
	}
	for i, c := range bad {
		if _, err := token.New(context.Background(), c, slog.Default()); err == nil {
			t.Errorf("config %d accepted: %+v", i, c)
		}
	}
}

// FuzzVerify checks that no input crashes the verifier and that nothing but
// the issuer's own tokens verifies.
func FuzzVerify(f *testing.F) {
	fx := setup(f)
	valid := mint(f, fx.issuer, tokentest.Claims{})
	f.Add(valid)
	f.Add("")
	f.Add("a.b.c")
	f.Add(valid[:len(valid)-2])
	f.Add(strings.Replace(valid, ".", "..", 1))
	f.Fuzz(func(t *testing.T, raw string) {
		_, err := fx.verifier.Verify(context.Background(), raw, aud)
		if err == nil && raw != valid {
			t.Fatalf("unexpected token verified: %q", raw)
		}
		if err != nil && token.ReasonOf(err) == "" {
			t.Fatalf("error without a reason: %v", err)
		}
	})
}

func BenchmarkVerify(b *testing.B) {
	f := setup(b)
	raw := mint(b, f.issuer, tokentest.Claims{Scopes: []string{"complete_code", "duo_chat"}})
	ctx := context.Background()
	if _, err := f.verifier.Verify(ctx, raw, aud); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := f.verifier.Verify(ctx, raw, aud); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func mustMintWith(t testing.TB, iss *tokentest.Issuer, key jwk.Key, hdr jws.Headers) string {
	t.Helper()
	s, err := iss.MintWith(key, tokentest.Claims{Subject: "i"}, hdr)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func kidHeader(kid string) jws.Headers {
	h := jws.NewHeaders()
	h.Set(jws.KeyIDKey, kid)
	return h
}

func fetchJWKS(t testing.TB, iss *tokentest.Issuer) []string {
	t.Helper()
	rec := httptest.NewRecorder()
	iss.Handler().ServeHTTP(rec, httptest.NewRequest("GET", tokentest.JWKSPath, nil))
	set, err := jwk.Parse(rec.Body.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	var kids []string
	for i := range set.Len() {
		k, _ := set.Key(i)
		kids = append(kids, k.KeyID())
	}
	return kids
}

func base64URL(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

// TestRefetchOutlivesCallerThatLeft rotates the issuer's key and lets the
// client whose unknown kid started the refetch give up while the JWKS is
// being fetched: the refetch must still complete, or the new key would stay
// unknown to everyone until the refetch interval allows another try.
func TestRefetchOutlivesCallerThatLeft(t *testing.T) {
	t.Parallel()
	var (
		iss     *tokentest.Issuer
		gated   atomic.Bool
		entered = make(chan struct{}, 1)
		release = make(chan struct{})
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == tokentest.JWKSPath && gated.Load() {
			select {
			case entered <- struct{}{}:
			default:
			}
			select {
			case <-release:
			case <-r.Context().Done():
				return
			}
		}
		iss.Handler().ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	var err error
	if iss, err = tokentest.New(srv.URL); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	v, err := token.New(ctx, token.Config{
		Issuers:                   []token.IssuerConfig{{Issuer: iss.URL(), Audiences: []string{aud}}},
		UnknownKeyRefetchInterval: time.Hour,
	}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.Verify(ctx, mint(t, iss, tokentest.Claims{}), aud); err != nil {
		t.Fatal(err)
	}
	if err := iss.Rotate(); err != nil {
		t.Fatal(err)
	}
	rotated := mint(t, iss, tokentest.Claims{})
	gated.Store(true)

	leaving, leave := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		_, err := v.Verify(leaving, rotated, aud)
		done <- err
	}()
	<-entered
	leave()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("caller that left: err = %v, want context.Canceled", err)
	}
	close(release)
	// The refetch finishes in the background.
	servertest.Eventually(t, "the rotated key to verify after the refetch was released", func() bool {
		_, err := v.Verify(ctx, rotated, aud)
		return err == nil
	})
}
