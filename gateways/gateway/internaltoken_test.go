package gateway_test

import (
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"

	"github.com/cloud-connector/cloud-connector/gateways/gateway"
	"github.com/cloud-connector/cloud-connector/gateways/internaltoken"
	"github.com/cloud-connector/cloud-connector/services/config"
)

const internalIssuer = "https://cloud.example/ai"

// withInternalToken configures a gateway to sign internal tokens with a
// fresh key.
func withInternalToken(tb testing.TB) func(*gateway.Config) {
	tb.Helper()
	key := filepath.Join(tb.TempDir(), "internal-token.pem")
	if err := internaltoken.WriteKeyFile(key); err != nil {
		tb.Fatal(err)
	}
	return func(c *gateway.Config) {
		c.InternalToken = &gateway.InternalTokenConfig{Issuer: internalIssuer, KeyFiles: []string{key},
			TTL: config.Duration(2 * time.Minute)}
	}
}

// fetchJWKS reads the gateway's published key set from url, as a backend
// would.
func (e *env) fetchJWKS(tb testing.TB, url, host string) (jwk.Set, *http.Response) {
	tb.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		tb.Fatal(err)
	}
	if host != "" {
		req.Host = host
	}
	res, err := e.client.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return nil, res
	}
	set, err := jwk.ParseReader(res.Body)
	if err != nil {
		tb.Fatalf("JWKS at %s: %v", url, err)
	}
	return set, res
}

// TestInternalToken checks that an authorized request reaches its backend
// with a token the backend can verify against the gateway's published
// keys, naming whom the gateway authorized; that a client cannot supply
// one; and that public routes get none.
func TestInternalToken(t *testing.T) {
	t.Parallel()
	e := setup(t, options{configure: withInternalToken(t)})

	// Published under the prefix and, for backends calling the Service by
	// name, at the root on any host.
	keys, res := e.fetchJWKS(t, e.base+"/.well-known/jwks.json", "")
	if keys == nil {
		t.Fatalf("JWKS under the prefix: status %d", res.StatusCode)
	}
	if ct := res.Header.Get("Content-Type"); ct != "application/jwk-set+json" {
		t.Errorf("JWKS Content-Type = %q", ct)
	}
	if byName, res := e.fetchJWKS(t, "http://"+e.g.Addr()+"/.well-known/jwks.json", "gateway-ai.cloud-connector.svc"); byName == nil || byName.Len() != keys.Len() {
		t.Fatalf("JWKS at the root by Service name: status %d", res.StatusCode)
	}

	req := e.newRequest(t, http.MethodPost, "/v2/code/completions", "allow", strings.NewReader(sampleBody))
	forged := "eyJhbGciOiJub25lIn0.eyJzdWIiOiJzb21lb25lLWVsc2UifQ."
	req.Header.Set(internaltoken.Header, forged)
	r := e.do(t, req)
	if r.status != http.StatusOK {
		t.Fatalf("status = %d (%s)", r.status, r.body)
	}
	toks := r.seen(t).Header.Values(internaltoken.Header)
	if len(toks) != 1 || toks[0] == forged {
		t.Fatalf("backend got %s %q; want one token from the gateway", internaltoken.Header, toks)
	}
	got, err := internaltoken.Verify(toks[0], keys, internalIssuer, "gitlab-ai-gateway")
	if err != nil {
		t.Fatalf("backend cannot verify the token: %v", err)
	}
	want := internaltoken.Claims{Audience: "gitlab-ai-gateway", Subject: instanceID, OrganizationID: orgID,
		Realm: realm, Feature: "complete_code", Plan: plan}
	if got != want {
		t.Fatalf("token claims = %+v; want %+v", got, want)
	}
	// The token is for this backend only.
	if _, err := internaltoken.Verify(toks[0], keys, internalIssuer, "gitlab-duo-workflow-service"); err == nil {
		t.Fatal("token verified for another backend's audience")
	}

	// A route with another backend gets a token for that backend.
	r = e.do(t, e.newRequest(t, http.MethodPost, "/v1/stream-h2", "allow", strings.NewReader(sampleBody)))
	if r.status != http.StatusOK {
		t.Fatalf("h2 route: status = %d (%s)", r.status, r.body)
	}
	if _, err := internaltoken.Verify(r.seen(t).Header.Get(internaltoken.Header), keys, internalIssuer, "gitlab-duo-workflow-service"); err != nil {
		t.Fatalf("h2 backend cannot verify its token: %v", err)
	}

	// Public routes authorize no one, so they carry no token.
	pub := e.newRequest(t, http.MethodGet, "/v1/models/definitions", "", nil)
	pub.Header.Set(internaltoken.Header, forged)
	r = e.do(t, pub)
	if r.status != http.StatusOK {
		t.Fatalf("public route: status = %d (%s)", r.status, r.body)
	}
	if v := r.seen(t).Header.Values(internaltoken.Header); len(v) != 0 {
		t.Fatalf("public route: backend got %s %q", internaltoken.Header, v)
	}
}

// TestNoInternalToken checks a gateway without internal_token: backends
// get no token, and no key set is published.
func TestNoInternalToken(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	r := e.post(t, "/v2/code/completions", "allow")
	if r.status != http.StatusOK {
		t.Fatalf("status = %d (%s)", r.status, r.body)
	}
	if v := r.seen(t).Header.Values(internaltoken.Header); len(v) != 0 {
		t.Fatalf("backend got %s %q", internaltoken.Header, v)
	}
	if set, res := e.fetchJWKS(t, e.base+"/.well-known/jwks.json", ""); set != nil || res.StatusCode != http.StatusNotFound {
		t.Fatalf("JWKS without internal_token: status %d", res.StatusCode)
	}
	if !strings.Contains(e.logs.String(), "internal_token not configured") {
		t.Error("no warning that backends get no internal token")
	}
}
