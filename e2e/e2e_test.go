package e2e_test

import (
	"bufio"
	"context"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/cloud-connector/cloud-connector/gateways/internaltoken"
	"github.com/cloud-connector/cloud-connector/services/authz"
	"github.com/cloud-connector/cloud-connector/services/server/servertest"
	"github.com/cloud-connector/cloud-connector/services/token/tokentest"
)

// TestCodeCompletion is the happy path: a GitLab instance's completion
// request is authorized, proxied, answered by the backend and metered.
func TestCodeCompletion(t *testing.T) {
	t.Parallel()
	s := setup(t, options{})
	h := gitlabHeaders(s.mint(t, tokentest.Claims{}))
	h.Set("X-Cloud-Connector-Organization-Id", "forged")
	h.Set("X-Request-ID", "req-e2e-1")
	res := s.do(t, "POST", s.aiURL("/v2/code/completions"), h, completionBody)
	if res.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %v", res.StatusCode, readJSON(t, res))
	}
	body := readJSON(t, res)
	if !strings.Contains(body["choices"].([]any)[0].(map[string]any)["text"].(string), "n % 2 == 0") {
		t.Fatalf("body = %v", body)
	}
	if res.Header.Get("X-Cloud-Connector-Units") != "" {
		t.Error("internal units header leaked to the client")
	}
	seen := s.backend.lastHeaders()
	if got := seen.Get("X-Cloud-Connector-Organization-Id"); got != s.orgID {
		t.Errorf("backend saw organization %q, want %q (client-sent value must be replaced)", got, s.orgID)
	}
	if seen.Get("X-Cloud-Connector-Feature") != "complete_code" || seen.Get("X-Request-Id") != "req-e2e-1" ||
		seen.Get("Authorization") == "" || seen.Get("X-Gitlab-Instance-Id") != instanceID {
		t.Errorf("backend headers = %v", seen)
	}
	// The backend can check who the gateway authorized without trusting
	// any header: the internal token verifies against the gateway's
	// published keys.
	keys, err := jwk.Fetch(context.Background(), s.aiURL("/.well-known/jwks.json"))
	if err != nil {
		t.Fatalf("fetch the gateway's JWKS: %v", err)
	}
	claims, err := internaltoken.Verify(seen.Get(internaltoken.Header), keys, internalIssuer+"/ai", aiAudience)
	if err != nil {
		t.Fatalf("backend cannot verify the internal token: %v", err)
	}
	if want := (internaltoken.Claims{Audience: aiAudience, Subject: instanceID, OrganizationID: s.orgID,
		Realm: "self-managed", Feature: "complete_code", Plan: "premium"}); claims != want {
		t.Errorf("internal token claims = %+v; want %+v", claims, want)
	}

	s.stop()
	var (
		org, inst, feature, gw, rt, method, reqID string
		status                                    int
		units, reqBytes, resBytes                 int64
	)
	err = s.pool.QueryRow(context.Background(), `SELECT organization_id::text, instance_id, feature, gateway, route, method,
		status, units, request_bytes, response_bytes, request_id FROM usage_events`).
		Scan(&org, &inst, &feature, &gw, &rt, &method, &status, &units, &reqBytes, &resBytes, &reqID)
	if err != nil {
		t.Fatalf("usage row: %v", err)
	}
	if org != s.orgID || inst != instanceID || feature != "complete_code" || gw != "ai" || rt != "code_completions_v2" ||
		method != "POST" || status != 200 || units != 12 || reqBytes != int64(len(completionBody)) || resBytes == 0 || reqID != "req-e2e-1" {
		t.Fatalf("usage row = %s %s %s %s %s %s %d units=%d req=%d res=%d %s", org, inst, feature, gw, rt, method, status,
			units, reqBytes, resBytes, reqID)
	}
}

// TestStreamingIsNotBuffered proves the first chunk of a streamed answer
// reaches the client while the backend is still producing the rest.
func TestStreamingIsNotBuffered(t *testing.T) {
	t.Parallel()
	s := setup(t, options{})
	// The backend holds the stream after its first chunk until released. A
	// gateway that buffers would deliver nothing, not even headers: the
	// deadline turns that hang into a failure.
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	res := s.doCtx(t, ctx, "POST", s.aiURL("/v2/code/completions"), gitlabHeaders(s.mint(t, tokentest.Claims{})),
		`{"stream":true,"current_file":{"file_name":"a.py","content_above_cursor":"def f():"}}`)
	if res.StatusCode != http.StatusOK || res.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("status %d content-type %q", res.StatusCode, res.Header.Get("Content-Type"))
	}
	r := bufio.NewReader(res.Body)
	if line, err := r.ReadString('\n'); err != nil || line != "data: bool:\n" {
		t.Fatalf("first chunk = %q, %v (while the backend held the rest of the stream)", line, err)
	}
	s.backend.releaseStreams()
	readLine(t, r) // blank line ending the first event
	if line := readLine(t, r); !strings.Contains(line, "return n % 2 == 0") {
		t.Fatalf("second chunk = %q", line)
	}
}

func TestNDJSONChat(t *testing.T) {
	t.Parallel()
	s := setup(t, options{})
	res := s.do(t, "POST", s.aiURL("/v2/chat/agent"), gitlabHeaders(s.mint(t, tokentest.Claims{})), `{"prompt":"hi"}`)
	if res.StatusCode != http.StatusOK || res.Header.Get("Content-Type") != "application/x-ndjson" {
		t.Fatalf("status %d content-type %q", res.StatusCode, res.Header.Get("Content-Type"))
	}
	r := bufio.NewReader(res.Body)
	var got []string
	for range 3 {
		got = append(got, readLine(t, r))
	}
	if !strings.Contains(got[2], `"world"`) {
		t.Fatalf("chunks = %q", got)
	}
}

// TestAuthenticationFailures checks every 401 a GitLab client handles,
// word for word.
func TestAuthenticationFailures(t *testing.T) {
	t.Parallel()
	s := setup(t, options{})
	valid := s.mint(t, tokentest.Claims{})
	foreign, err := tokentest.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	// Same kid as the issuer's key, signed by another: a forgery.
	forged, err := s.issuer.MintWith(withKid(t, foreign, s.issuer), tokentest.Claims{Subject: instanceID, Scopes: []string{"complete_code"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		mutate func(http.Header)
		want   string
	}{
		{"no authorization header", func(h http.Header) { h.Del("Authorization") }, authz.MsgNoAuthorization},
		{"not oidc", func(h http.Header) { h.Set("X-Gitlab-Authentication-Type", "pat") }, authz.MsgInvalidAuthType},
		{"auth type missing", func(h http.Header) { h.Del("X-Gitlab-Authentication-Type") }, authz.MsgInvalidAuthType},
		{"not bearer", func(h http.Header) { h.Set("Authorization", "Basic dXNlcjpwYXNz") }, authz.MsgInvalidHeader},
		{"malformed token", func(h http.Header) { h.Set("Authorization", "Bearer not.a.jwt") }, authz.MsgForbiddenByAuth},
		{"bad signature", func(h http.Header) { h.Set("Authorization", "Bearer "+forged) }, authz.MsgForbiddenByAuth},
		{"expired", func(h http.Header) {
			h.Set("Authorization", "Bearer "+s.mint(t, tokentest.Claims{IssuedAt: time.Now().Add(-4 * time.Hour), TTL: time.Hour}))
		}, authz.MsgForbiddenByAuth},
		{"wrong audience", func(h http.Header) {
			h.Set("Authorization", "Bearer "+s.mint(t, tokentest.Claims{Audience: []string{"gitlab-cicd"}}))
		}, authz.MsgForbiddenByAuth},
		{"instance header mismatch", func(h http.Header) { h.Set("X-Gitlab-Instance-Id", "someone-else") }, authz.MsgInstanceIDHeader},
		{"realm header mismatch", func(h http.Header) { h.Set("X-Gitlab-Realm", "saas") }, authz.MsgRealmHeader},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := gitlabHeaders(valid)
			tt.mutate(h)
			res := s.do(t, "POST", s.aiURL("/v2/code/completions"), h, completionBody)
			if res.StatusCode != http.StatusUnauthorized {
				t.Fatalf("status = %d, want 401", res.StatusCode)
			}
			if body := readJSON(t, res); body["error"] != tt.want || len(body) != 1 {
				t.Fatalf("body = %v, want {\"error\": %q}", body, tt.want)
			}
		})
	}
}

func withKid(t *testing.T, key jwk.Key, iss *tokentest.Issuer) jwk.Key {
	t.Helper()
	tok, err := iss.Mint(tokentest.Claims{Subject: "x"})
	if err != nil {
		t.Fatal(err)
	}
	msg, err := jws.Parse([]byte(tok))
	if err != nil {
		t.Fatal(err)
	}
	key.Set(jwk.KeyIDKey, msg.Signatures()[0].ProtectedHeaders().KeyID())
	return key
}

// TestEntitlementFailures checks the 403s.
func TestEntitlementFailures(t *testing.T) {
	t.Parallel()
	s := setup(t, options{})
	tests := []struct {
		name, path, feature string
		claims              tokentest.Claims
		headers             map[string]string
	}{
		{"feature not in token scopes", "/v2/code/generations", "generate_code", tokentest.Claims{Scopes: []string{"complete_code"}}, nil},
		{"add-on does not cover feature", "/v2/code/completions", "complete_code", tokentest.Claims{}, nil},
		{"GitLab too old", "/v2/code/completions", "complete_code", tokentest.Claims{}, map[string]string{"X-Gitlab-Version": "16.5.0"}},
		{"unregistered instance", "/v2/code/completions", "complete_code", tokentest.Claims{Subject: "unknown-instance"},
			map[string]string{"X-Gitlab-Instance-Id": "unknown-instance"}},
	}
	// The organization loses its add-on for the second case only: use a
	// second organization seeded without add-ons.
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			target := s
			if tt.name == "add-on does not cover feature" {
				target = setup(t, options{addOns: []authz.AddOn{}})
			}
			h := gitlabHeaders(target.mint(t, tt.claims))
			for k, v := range tt.headers {
				h.Set(k, v)
			}
			res := target.do(t, "POST", target.aiURL(tt.path), h, completionBody)
			if res.StatusCode != http.StatusForbidden {
				t.Fatalf("status = %d, want 403", res.StatusCode)
			}
			want := "Unauthorized to access " + tt.feature
			if body := readJSON(t, res); body["detail"] != want {
				t.Fatalf("body = %v, want {\"detail\": %q}", body, want)
			}
		})
	}
}

// TestRateBudget: with a budget of N requests per window exactly N are
// allowed, then 429 with Retry-After; each allowed request leaves a usage
// row.
func TestRateBudget(t *testing.T) {
	t.Parallel()
	const limit = 7
	s := setup(t, options{budgets: map[string]string{
		"code_suggestions": "{limit: 7, window_seconds: 3600, unit: request, kind: rate}",
	}})
	h := gitlabHeaders(s.mint(t, tokentest.Claims{}))
	var allowed, limited atomic.Int32
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res := s.do(t, "POST", s.aiURL("/v2/code/completions"), h.Clone(), completionBody)
			switch res.StatusCode {
			case http.StatusOK:
				allowed.Add(1)
			case http.StatusTooManyRequests:
				limited.Add(1)
				body := readJSON(t, res)
				retry, err := strconv.Atoi(res.Header.Get("Retry-After"))
				if body["detail"] != "Too many requests. Please try again later." || err != nil || retry < 1 || retry > 3600 ||
					res.Header.Get("RateLimit-Limit") != strconv.Itoa(limit) {
					t.Errorf("429 body %v Retry-After %q RateLimit-Limit %q", body, res.Header.Get("Retry-After"), res.Header.Get("RateLimit-Limit"))
				}
			default:
				t.Errorf("unexpected status %d", res.StatusCode)
			}
		}()
	}
	wg.Wait()
	if allowed.Load() != limit || limited.Load() != 20-limit {
		t.Fatalf("allowed %d, limited %d; want %d and %d", allowed.Load(), limited.Load(), limit, 20-limit)
	}
	s.stop()
	var rows int
	if err := s.pool.QueryRow(context.Background(), `SELECT count(*) FROM usage_events`).Scan(&rows); err != nil || rows != limit {
		t.Fatalf("usage rows = %d, %v; want %d", rows, err, limit)
	}
	var used int64
	if err := s.pool.QueryRow(context.Background(), `SELECT used_units FROM budget_counters WHERE bucket = 'code_suggestions'`).Scan(&used); err != nil || used != limit {
		t.Fatalf("used_units = %d, %v; want %d", used, err, limit)
	}
}

// TestQuotaBudget: a quota (credits) answers 402 USAGE_QUOTA_EXCEEDED, on
// the CI/CD gateway.
func TestQuotaBudget(t *testing.T) {
	t.Parallel()
	s := setup(t, options{budgets: map[string]string{
		"ci_hosted_runners": "{limit: 2, window_seconds: 2592000, unit: request, kind: quota}",
	}})
	h := gitlabHeaders(s.mint(t, tokentest.Claims{Audience: []string{"gitlab-cicd"}, Scopes: []string{"ci_hosted_runners"}}))
	for i := range 3 {
		res := s.do(t, "POST", s.cicdURL("/v1/runners/jobs"), h.Clone(), `{}`)
		if i < 2 {
			if res.StatusCode != http.StatusOK {
				t.Fatalf("request %d: status %d %v", i, res.StatusCode, readJSON(t, res))
			}
			continue
		}
		if res.StatusCode != http.StatusPaymentRequired || res.Header.Get("Retry-After") == "" {
			t.Fatalf("status %d Retry-After %q, want 402 with Retry-After", res.StatusCode, res.Header.Get("Retry-After"))
		}
		if body := readJSON(t, res); body["error"] != "insufficient_credits" || body["error_code"] != "USAGE_QUOTA_EXCEEDED" || body["message"] == "" {
			t.Fatalf("402 body = %v", body)
		}
	}
}

// TestBudgetAcrossGateways runs two AI gateway replicas on one database:
// together they never allow more than the limit.
func TestBudgetAcrossGateways(t *testing.T) {
	t.Parallel()
	const limit = 25
	s := setup(t, options{budgets: map[string]string{
		"code_suggestions": "{limit: 25, window_seconds: 3600, unit: request, kind: rate}",
	}})
	replica := s.startGateway(t, "ai", "/ai", s.aiBackends)
	servertest.WaitHealthy(t, replica.AdminAddr())
	h := gitlabHeaders(s.mint(t, tokentest.Claims{}))
	var allowed atomic.Int32
	var wg sync.WaitGroup
	for i := range 60 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			addr := s.ai.Addr()
			if i%2 == 1 {
				addr = replica.Addr()
			}
			res := s.do(t, "POST", "http://"+addr+"/ai/v2/code/completions", h.Clone(), completionBody)
			if res.StatusCode == http.StatusOK {
				allowed.Add(1)
			}
		}()
	}
	wg.Wait()
	if allowed.Load() > limit {
		t.Fatalf("two replicas allowed %d requests, limit %d", allowed.Load(), limit)
	}
	// A replica is refused only when the rest is leased to the other, which
	// holds at most one small lease (limit/10 = 2 units here).
	if allowed.Load() < limit-2 {
		t.Fatalf("two replicas allowed only %d of %d with demand to spare", allowed.Load(), limit)
	}
	// Stopping returns unspent leases: the counter equals what was allowed.
	s.stop()
	var used int64
	if err := s.pool.QueryRow(context.Background(), `SELECT used_units FROM budget_counters`).Scan(&used); err != nil || used != int64(allowed.Load()) {
		t.Fatalf("used_units = %d, %v; want %d", used, err, allowed.Load())
	}
}
