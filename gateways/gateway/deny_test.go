package gateway_test

import (
	"context"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	authzv1 "github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1"
)

func TestDenials(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	for _, tc := range []struct {
		name   string
		token  string
		status int
		body   map[string]any
	}{
		{"unauthenticated", "unauth", 401, map[string]any{"error": "Forbidden by auth provider"}},
		{"no token", "", 401, map[string]any{"error": "No authorization header presented"}},
		{"unknown token", "garbage", 401, map[string]any{"error": "Invalid authorization header"}},
		{"forbidden", "forbidden", 403, map[string]any{"detail": "Unauthorized to access complete_code"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.post(t, "/v2/code/completions", tc.token)
			wantJSON(t, r, tc.status, tc.body)
			if r.header.Get("X-Request-Id") == "" {
				t.Error("denial without X-Request-Id")
			}
			if r.header.Get("X-Backend") != "" {
				t.Error("denied request reached the backend")
			}
		})
	}
	if got := e.metric(t, "cloudconnector_gateway_denials_total", `route="code_completions"`, `code="401"`); got != 3 {
		t.Errorf("401 denials metric = %v; want 3", got)
	}
	if got := e.metric(t, "cloudconnector_gateway_denials_total", `code="403"`, `reason="not_in_scopes"`); got != 1 {
		t.Errorf("403 denials metric = %v; want 1", got)
	}
	e.stopped(t)
	if rows := e.usage(t); len(rows) != 0 {
		t.Errorf("usage rows for denials = %d; want 0", len(rows))
	}
}

func TestDecisionServiceDown(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	e.fake.srv.Close()
	r := e.post(t, "/v2/code/completions", "allow")
	wantJSON(t, r, 503, map[string]any{"detail": "Service temporarily unavailable"})
	if got := r.header.Get("Retry-After"); got != "5" {
		t.Errorf("Retry-After = %q; want 5", got)
	}
	e.stopped(t)
	if rows := e.usage(t); len(rows) != 0 {
		t.Errorf("usage rows = %d; want 0", len(rows))
	}
}

// budgeted is an allow with a budget of limit per longWindow of kind.
func budgeted(limit int64, kind authzv1.BudgetKind, org string) *authzv1.AuthorizeResponse {
	res := allowed(time.Minute, limit)
	res.Budget.Kind = kind
	res.Subject.OrganizationId = org
	return res
}

func TestBudget(t *testing.T) {
	t.Parallel()
	t.Run("rate", func(t *testing.T) {
		t.Parallel()
		e := setup(t, options{})
		e.fake.set("rate", budgeted(3, authzv1.BudgetKind_BUDGET_KIND_RATE, orgID))
		for i := range 3 {
			if r := e.post(t, "/v2/code/completions", "rate"); r.status != 200 {
				t.Fatalf("request %d: status %d (%s); want 200", i+1, r.status, r.body)
			}
		}
		for range 2 {
			r := e.post(t, "/v2/code/completions", "rate")
			wantJSON(t, r, 429, map[string]any{"detail": "Too many requests. Please try again later."})
			wantRateLimitHeaders(t, r, 3)
		}
		e.stopped(t)
		if used := usedUnits(t, e, orgID); used != 3 {
			t.Errorf("budget_counters.used_units = %d after shutdown; want 3 (leases returned)", used)
		}
		if rows := e.usage(t); len(rows) != 3 {
			t.Errorf("usage rows = %d; want 3", len(rows))
		}
	})
	t.Run("concurrent", func(t *testing.T) {
		t.Parallel()
		e := setup(t, options{})
		e.fake.set("burst", budgeted(5, authzv1.BudgetKind_BUDGET_KIND_RATE, orgID))
		const n = 24
		codes := make(chan int, n)
		var wg sync.WaitGroup
		for range n {
			wg.Go(func() {
				res, err := e.client.Do(e.newRequest(t, http.MethodPost, "/v2/code/completions", "burst", strings.NewReader("{}")))
				if err != nil {
					t.Error(err)
					return
				}
				io.Copy(io.Discard, res.Body)
				res.Body.Close()
				codes <- res.StatusCode
			})
		}
		wg.Wait()
		close(codes)
		count := map[int]int{}
		for c := range codes {
			count[c]++
		}
		if count[200] != 5 || count[429] != n-5 {
			t.Errorf("statuses %v; want exactly 5 allowed and %d refused", count, n-5)
		}
	})
	t.Run("quota", func(t *testing.T) {
		t.Parallel()
		e := setup(t, options{})
		e.fake.set("quota", budgeted(2, authzv1.BudgetKind_BUDGET_KIND_QUOTA, orgID))
		for i := range 2 {
			if r := e.post(t, "/v2/code/completions", "quota"); r.status != 200 {
				t.Fatalf("request %d: status %d; want 200", i+1, r.status)
			}
		}
		r := e.post(t, "/v2/code/completions", "quota")
		if r.status != http.StatusPaymentRequired {
			t.Fatalf("status = %d (%s); want 402", r.status, r.body)
		}
		m := r.json(t)
		msg, _ := m["message"].(string)
		if len(m) != 3 || m["error"] != "insufficient_credits" || m["error_code"] != "USAGE_QUOTA_EXCEEDED" ||
			!strings.HasPrefix(msg, "Usage quota for complete_code is exhausted; it renews at ") {
			t.Errorf("body = %s; want GitLab's insufficient_credits shape", r.body)
		}
		wantRateLimitHeaders(t, r, 2)
	})
	t.Run("zero limit", func(t *testing.T) {
		t.Parallel()
		e := setup(t, options{})
		e.fake.set("zero", budgeted(0, authzv1.BudgetKind_BUDGET_KIND_RATE, orgID))
		wantJSON(t, e.post(t, "/v2/code/completions", "zero"), 429, map[string]any{"detail": "Too many requests. Please try again later."})
	})
	t.Run("instance without organization", func(t *testing.T) {
		t.Parallel()
		e := setup(t, options{})
		e.fake.set("noorg", budgeted(1, authzv1.BudgetKind_BUDGET_KIND_RATE, ""))
		if r := e.post(t, "/v2/code/completions", "noorg"); r.status != 200 {
			t.Fatalf("status = %d; want 200", r.status)
		}
		if r := e.post(t, "/v2/code/completions", "noorg"); r.status != 429 {
			t.Fatalf("status = %d; want 429", r.status)
		}
		e.stopped(t)
		if used := usedUnits(t, e, "instance:"+instanceID); used != 1 {
			t.Errorf("used units of instance:%s = %d; want 1", instanceID, used)
		}
		rows := e.usage(t)
		if len(rows) != 1 || rows[0].OrganizationID != nil {
			t.Errorf("usage rows %+v; want one without organization", rows)
		}
	})
	t.Run("shared across routes", func(t *testing.T) {
		t.Parallel()
		e := setup(t, options{})
		e.fake.set("shared", budgeted(2, authzv1.BudgetKind_BUDGET_KIND_RATE, orgID))
		codes := []int{
			e.post(t, "/v2/code/completions", "shared").status,
			e.post(t, "/v4/code/suggestions", "shared").status,
			e.post(t, "/v2/chat/agent", "shared").status,
		}
		if codes[0] != 200 || codes[1] != 200 || codes[2] != 429 {
			t.Errorf("statuses = %v; want 200 200 429 (one bucket)", codes)
		}
	})
}

func wantRateLimitHeaders(tb testing.TB, r result, limit int) {
	tb.Helper()
	retry, err := strconv.Atoi(r.header.Get("Retry-After"))
	if err != nil || retry < 1 {
		tb.Errorf("Retry-After = %q; want whole seconds >= 1", r.header.Get("Retry-After"))
	}
	if got := r.header.Get("RateLimit-Limit"); got != strconv.Itoa(limit) {
		tb.Errorf("RateLimit-Limit = %q; want %d", got, limit)
	}
	if got := r.header.Get("RateLimit-Remaining"); got != "0" {
		tb.Errorf("RateLimit-Remaining = %q; want 0", got)
	}
	if got := r.header.Get("RateLimit-Reset"); got != r.header.Get("Retry-After") {
		tb.Errorf("RateLimit-Reset = %q; want Retry-After's %q", got, r.header.Get("Retry-After"))
	}
}

func usedUnits(tb testing.TB, e *env, subject string) int64 {
	tb.Helper()
	var used int64
	if err := e.pool(tb).QueryRow(context.Background(),
		`SELECT coalesce(sum(used_units), 0) FROM budget_counters WHERE subject = $1`, subject).Scan(&used); err != nil {
		tb.Fatal(err)
	}
	return used
}

// TestBudgetUnavailable: when the budget store cannot be reached the
// route's fail mode decides; a budget the limiter cannot enforce is the
// decision service's bug and is refused on every route.
func TestBudgetUnavailable(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	bad := allowed(time.Minute, 10)
	bad.Budget.Window = durationpb.New(1500 * time.Millisecond) // not whole seconds
	e.fake.set("bad", bad)
	for _, path := range []string{"/v2/code/completions", "/v1/open"} {
		r := e.post(t, path, "bad")
		wantJSON(t, r, 503, map[string]any{"detail": "Service temporarily unavailable"})
		if got := r.header.Get("Retry-After"); got != "5" {
			t.Errorf("Retry-After = %q; want 5", got)
		}
	}

	// The budget store goes away before any lease was taken.
	if _, err := e.pool(t).Exec(context.Background(), `ALTER TABLE budget_counters RENAME TO budget_counters_gone`); err != nil {
		t.Fatal(err)
	}
	e.fake.set("ok", allowed(time.Minute, 10))
	if r := e.post(t, "/v2/code/completions", "ok"); r.status != 503 {
		t.Errorf("fail-closed route with the store down: status %d; want 503", r.status)
	}
	if r := e.post(t, "/v1/open", "ok"); r.status != 200 {
		t.Errorf("fail-open route with the store down: status %d; want 200", r.status)
	}
}

func TestDecisionCache(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	send := func(t *testing.T, edit func(*http.Request)) {
		t.Helper()
		req := e.newRequest(t, http.MethodPost, "/v2/code/completions", "cached", strings.NewReader("{}"))
		if edit != nil {
			edit(req)
		}
		if r := e.do(t, req); r.status != 200 {
			t.Fatalf("status %d (%s); want 200", r.status, r.body)
		}
	}
	for range 3 {
		send(t, nil)
	}
	if n := e.fake.count(); n != 1 {
		t.Fatalf("decision calls for 3 identical requests = %d; want 1", n)
	}
	e.fake.set("cached-2", allowed(time.Minute, 1<<40))
	for _, tc := range []struct {
		name   string
		edit   func(*http.Request)
		cached bool
	}{
		{"request id", func(r *http.Request) { r.Header.Set("X-Request-Id", "another-id") }, true},
		{"body", func(r *http.Request) { r.Body = http.NoBody; r.ContentLength = 0 }, true},
		{"token", func(r *http.Request) { r.Header.Set("Authorization", "Bearer cached-2") }, false},
		{"instance", func(r *http.Request) { r.Header.Set("X-Gitlab-Instance-Id", "inst-2") }, false},
		{"realm", func(r *http.Request) { r.Header.Set("X-Gitlab-Realm", "saas") }, false},
		{"version", func(r *http.Request) { r.Header.Set("X-Gitlab-Version", "17.7.0") }, false},
		{"user", func(r *http.Request) { r.Header.Set("X-Gitlab-Global-User-Id", "user-9") }, false},
		{"client type", func(r *http.Request) { r.Header.Set("X-Gitlab-Client-Type", "jetbrains") }, false},
		{"deployment type", func(r *http.Request) { r.Header.Set("X-Gitlab-Deployment-Type", "dedicated") }, false},
		{"host name", func(r *http.Request) { r.Header.Set("X-Gitlab-Host-Name", "other.example.com") }, false},
		{"auth type", func(r *http.Request) { r.Header.Set("X-Gitlab-Authentication-Type", "OIDC") }, false},
		{"feature and path", func(r *http.Request) { r.URL.Path = e.cfg.Prefix + "/v2/chat/agent" }, false},
		{"path, same feature", func(r *http.Request) { r.URL.Path = e.cfg.Prefix + "/v4/code/suggestions" }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := e.fake.count()
			send(t, tc.edit)
			want := before + 1
			if tc.cached {
				want = before
			}
			if got := e.fake.count(); got != want {
				t.Errorf("decision calls went %d -> %d; want %d", before, got, want)
			}
		})
	}

	t.Run("served while the service is down", func(t *testing.T) {
		e.fake.srv.Close()
		send(t, func(r *http.Request) { r.Header.Set("X-Request-Id", "while-down") })
		r := e.post(t, "/v2/code/completions", "uncached-token")
		if r.status != 503 {
			t.Errorf("uncached request with the service down: status %d; want 503", r.status)
		}
	})
}

func TestDecisionNotCachedWithoutTTL(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	for range 3 {
		if r := e.post(t, "/v2/code/completions", "allow"); r.status != 200 {
			t.Fatalf("status %d; want 200", r.status)
		}
	}
	if n := e.fake.count(); n != 3 {
		t.Errorf("decision calls = %d; want 3 (ttl 0 is not cached)", n)
	}
	// Denials are cached for their ttl too.
	for range 2 {
		e.post(t, "/v2/code/completions", "forbidden")
	}
	if n := e.fake.count(); n != 4 {
		t.Errorf("decision calls = %d; want 4", n)
	}
}
