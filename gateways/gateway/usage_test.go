package gateway_test

import (
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	authzv1 "github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1"
)

func TestUsage(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	nouser := allowed(0, 1<<40)
	nouser.Subject.GlobalUserId = ""
	e.fake.set("nouser", nouser)
	limited := budgeted(1, authzv1.BudgetKind_BUDGET_KIND_RATE, orgID)
	limited.Budget.Bucket = "limited"
	e.fake.set("limited", limited)

	req := e.newRequest(t, http.MethodPost, "/v2/code/completions", "allow", strings.NewReader(sampleBody))
	req.Header.Set("X-Request-Id", "usage-1")
	req.Header.Set("X-Gitlab-Global-User-Id", "user-7")
	req.Header.Set("X-Gitlab-Client-Type", "vscode")
	first := e.do(t, req)

	req = e.newRequest(t, http.MethodPost, "/v1/prompts/chat", "nouser", strings.NewReader("{}"))
	req.Header.Set("X-Request-Id", "usage-2")
	req.Header.Set("X-Gitlab-Unit-Primitive", "duo_chat")
	req.Header.Set("X-Gitlab-Global-User-Id", "user-8")
	req.Header.Del("X-Gitlab-Version")
	second := e.do(t, req)
	if first.status != 200 || second.status != 200 {
		t.Fatalf("statuses %d, %d; want 200", first.status, second.status)
	}
	if r := e.post(t, "/v2/code/completions", "limited"); r.status != 200 {
		t.Fatalf("limited: status %d; want 200", r.status)
	}

	// None of these is metered.
	e.post(t, "/v2/code/completions", "unauth")
	e.post(t, "/v2/code/completions", "forbidden")
	e.post(t, "/v2/code/completions", "limited") // 429
	e.post(t, "/v9/unknown", "allow")
	e.do(t, e.newRequest(t, http.MethodGet, "/v2/code/completions", "allow", nil))
	e.raw(t, rawRequest("POST", "/ai/v2/../x", "allow"))
	e.do(t, e.newRequest(t, http.MethodPost, "/v1/prompts/x", "allow", strings.NewReader("{}"))) // no feature header
	e.do(t, e.newRequest(t, http.MethodGet, "/v1/models/definitions", "", nil))

	e.stopped(t)
	rows := e.usage(t)
	if len(rows) != 3 || rows[2].Route != "code_completions" {
		t.Fatalf("usage rows = %d; want 3 (one per proxied request): %+v", len(rows), rows)
	}
	str := func(p *string) string {
		if p == nil {
			return "<nil>"
		}
		return *p
	}
	for i, tc := range []struct {
		row                                           usageRow
		user, feature, route, requestID, version, cli string
		reqBytes, respBytes                           int
	}{
		{rows[0], "user-from-token", "complete_code", "code_completions", "usage-1", "17.6.0", "vscode", len(sampleBody), len(first.body)},
		{rows[1], "user-8", "duo_chat", "prompts", "usage-2", "<nil>", "<nil>", 2, len(second.body)},
	} {
		u := tc.row
		if str(u.OrganizationID) != orgID || u.InstanceID != instanceID || u.Realm != realm || str(u.GlobalUserID) != tc.user ||
			u.Feature != tc.feature || u.Gateway != "ai" || u.Route != tc.route || u.Method != "POST" || u.Status != 200 ||
			u.RequestBytes != int64(tc.reqBytes) || u.ResponseBytes != int64(tc.respBytes) || u.Units == nil || *u.Units != 42 ||
			str(u.RequestID) != tc.requestID || str(u.GitLabVersion) != tc.version || str(u.ClientType) != tc.cli ||
			u.DurationMS < 0 || u.DurationMS > float64(time.Hour/time.Millisecond) {
			t.Errorf("row %d = {org %s inst %s realm %s user %s feature %s gateway %s route %s %s status %d bytes %d/%d units %v "+
				"request_id %s version %s client %s duration %vms}; want org %s, user %s, feature %s, route %s, status 200, bytes %d/%d, units 42, "+
				"request_id %s, version %s, client %s",
				i, str(u.OrganizationID), u.InstanceID, u.Realm, str(u.GlobalUserID), u.Feature, u.Gateway, u.Route, u.Method, u.Status,
				u.RequestBytes, u.ResponseBytes, u.Units, str(u.RequestID), str(u.GitLabVersion), str(u.ClientType), u.DurationMS,
				orgID, tc.user, tc.feature, tc.route, tc.reqBytes, tc.respBytes, tc.requestID, tc.version, tc.cli)
		}
	}
}

// TestUsageUnitsOnlyFromBackend: units come from the backend's response
// header, never from the client, and are NULL when the backend reports
// none or nonsense.
func TestUsageUnitsOnlyFromBackend(t *testing.T) {
	t.Parallel()
	backend := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if v := r.URL.Query().Get("units"); v != "" {
			w.Header().Set("X-Cloud-Connector-Units", v)
		}
		w.Write([]byte("ok"))
	})
	e := setup(t, options{handler: backend})
	for _, units := range []string{"", "-1", "many", "0", "9"} {
		req := e.newRequest(t, http.MethodPost, "/v2/code/completions?units="+units, "allow", strings.NewReader("{}"))
		req.Header.Set("X-Cloud-Connector-Units", "1000")
		req.Header.Set("X-Request-Id", "units-"+units)
		if r := e.do(t, req); r.status != 200 || r.header.Get("X-Cloud-Connector-Units") != "" {
			t.Fatalf("status %d, units header %q", r.status, r.header.Get("X-Cloud-Connector-Units"))
		}
	}
	e.stopped(t)
	got := map[string]string{}
	for _, u := range e.usage(t) {
		v := "NULL"
		if u.Units != nil {
			v = strconv.FormatInt(*u.Units, 10)
		}
		got[*u.RequestID] = v
	}
	want := map[string]string{"units-": "NULL", "units--1": "NULL", "units-many": "NULL", "units-0": "0", "units-9": "9"}
	for id, w := range want {
		if got[id] != w {
			t.Errorf("units of %s = %s; want %s", id, got[id], w)
		}
	}
}
