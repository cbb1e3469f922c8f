package opa_test

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cloud-connector/cloud-connector/policies"
	"github.com/cloud-connector/cloud-connector/services/authz"
	"github.com/cloud-connector/cloud-connector/services/opa"
)

var discard = slog.New(slog.NewTextHandler(io.Discard, nil))

func input() authz.PolicyInput {
	return authz.PolicyInput{
		Claims: map[string]any{"sub": "inst-1", "scopes": []any{"complete_code"}, "gitlab_realm": "self-managed"},
		Organization: &authz.Organization{ID: "org-1", Name: "Acme", Plan: "premium",
			AddOns: []authz.AddOn{{Name: "duo_pro", Seats: 3}}},
		Feature:  "complete_code",
		Audience: "gitlab-ai-gateway",
		Facts:    authz.Facts{Method: "POST", Path: "/v2/code/completions", GitLabVersion: "17.5.0"},
		Now:      time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC),
	}
}

func TestEvaluateEmbedded(t *testing.T) {
	t.Parallel()
	e, err := opa.New(context.Background(), opa.Config{}, discard)
	if err != nil {
		t.Fatal(err)
	}
	res, err := e.Evaluate(context.Background(), input())
	if err != nil {
		t.Fatal(err)
	}
	want := authz.Budget{Bucket: "code_suggestions", Limit: 600, Window: time.Minute, Unit: "request", Kind: authz.Rate}
	if !res.Allow || res.Budget == nil || *res.Budget != want {
		t.Fatalf("result = %+v budget %+v, want allow with %+v", res, res.Budget, want)
	}
	if res.CacheTTL != 30*time.Second || res.Revision == "" || len(res.Explanation) != 2 {
		t.Fatalf("ttl %v revision %q explanation %q", res.CacheTTL, res.Revision, res.Explanation)
	}

	in := input()
	in.Organization = nil
	res, err = e.Evaluate(context.Background(), in)
	if err != nil {
		t.Fatal(err)
	}
	if res.Allow || res.Reason != "unknown_instance" || res.Message != "Unauthorized to access complete_code" || res.Budget != nil {
		t.Fatalf("unregistered instance: %+v", res)
	}
}

func writePolicy(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.CopyFS(dir, policies.FS()); err != nil {
		t.Fatal(err)
	}
	// CopyFS keeps embedded files read-only.
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if d.IsDir() {
			return os.Chmod(p, 0o755)
		}
		return os.Chmod(p, 0o644)
	})
	return dir
}

func replaceIn(t *testing.T, path, old, new string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), old) {
		t.Fatalf("%s does not contain %q", path, old)
	}
	if err := os.WriteFile(path, []byte(strings.Replace(string(b), old, new, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestReload changes the policy directory the way the product team would:
// a data change is picked up, a broken or test-failing bundle is rejected
// and the last good one keeps serving.
func TestReload(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := writePolicy(t)
	e, err := opa.New(ctx, opa.Config{Dir: dir}, discard)
	if err != nil {
		t.Fatal(err)
	}
	rev := e.Revision()
	if err := e.Reload(ctx); err != nil || e.Revision() != rev {
		t.Fatalf("reload without change: %v, revision %s -> %s", err, rev, e.Revision())
	}

	replaceIn(t, filepath.Join(dir, "overrides", "data.yaml"), "organizations: {}",
		"organizations:\n  org-1:\n    budgets:\n      code_suggestions: {limit: 7, window_seconds: 60, unit: request, kind: rate}\n")
	if err := e.Reload(ctx); err != nil {
		t.Fatalf("reload with data change: %v", err)
	}
	if e.Revision() == rev {
		t.Fatal("revision unchanged after data change")
	}
	res, err := e.Evaluate(ctx, input())
	if err != nil || res.Budget.Limit != 7 {
		t.Fatalf("after reload: %+v, %v; want limit 7", res.Budget, err)
	}
	good := e.Revision()

	// A syntax error is rejected.
	rego := filepath.Join(dir, "authz.rego")
	orig, _ := os.ReadFile(rego)
	os.WriteFile(rego, append(orig, []byte("\nbroken := {\n")...), 0o644)
	if err := e.Reload(ctx); err == nil {
		t.Fatal("broken policy accepted")
	}
	if e.Revision() != good {
		t.Fatal("revision changed after rejected reload")
	}
	os.WriteFile(rego, orig, 0o644)

	// A change that breaks the policy's own tests is rejected too.
	replaceIn(t, filepath.Join(dir, "plans", "data.yaml"), "code_suggestions: {limit: 600,", "code_suggestions: {limit: 601,")
	if err := e.Reload(ctx); err == nil || !strings.Contains(err.Error(), "test_allowed_by_add_on") {
		t.Fatalf("reload with failing test: %v, want the failing test named", err)
	}
	res, err = e.Evaluate(ctx, input())
	if err != nil || res.Budget.Limit != 7 || res.Revision != good {
		t.Fatalf("after rejected reload: %+v rev %s, %v", res.Budget, res.Revision, err)
	}
}

// TestRejectedBundleReportedOnce checks that a broken bundle left in place
// is compiled and reported once, not on every reload tick, and that fixing
// it is picked up.
func TestRejectedBundleReportedOnce(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := writePolicy(t)
	reg := prometheus.NewRegistry()
	e, err := opa.New(ctx, opa.Config{Dir: dir, Registerer: reg}, discard)
	if err != nil {
		t.Fatal(err)
	}
	rejected := func() float64 {
		return counterValue(t, reg, "cloudconnector_policy_reloads_total", "rejected")
	}
	rego := filepath.Join(dir, "authz.rego")
	orig, err := os.ReadFile(rego)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(rego, append(orig, []byte("\nbroken := {\n")...), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := e.Reload(ctx); err == nil {
		t.Fatal("broken policy accepted")
	}
	for range 3 {
		if err := e.Reload(ctx); err != nil {
			t.Fatalf("unchanged broken bundle reported again: %v", err)
		}
	}
	if got := rejected(); got != 1 {
		t.Fatalf("rejected reloads = %v, want 1", got)
	}
	// Fixing the file is noticed; breaking it the same way again is
	// reported again.
	if err := os.WriteFile(rego, append(orig, []byte("\n# fixed\n")...), 0o644); err != nil {
		t.Fatal(err)
	}
	rev := e.Revision()
	if err := e.Reload(ctx); err != nil || e.Revision() == rev {
		t.Fatalf("fixed bundle: %v, revision %s -> %s", err, rev, e.Revision())
	}
	if err := os.WriteFile(rego, append(orig, []byte("\nbroken := {\n")...), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := e.Reload(ctx); err == nil {
		t.Fatal("broken policy accepted after a good one")
	}
	if got := rejected(); got != 2 {
		t.Fatalf("rejected reloads = %v, want 2", got)
	}
}

// counterValue reads the child of the named counter vector whose label has
// the given value, as gathered from reg (0 when absent).
func counterValue(t *testing.T, reg *prometheus.Registry, name, label string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetValue() == label {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

func TestNewRejectsInvalidDir(t *testing.T) {
	t.Parallel()
	_, err := opa.New(context.Background(), opa.Config{Dir: filepath.Join(t.TempDir(), "missing")}, discard)
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing dir: %v, want a not-exist error", err)
	}
	if _, err := opa.New(context.Background(), opa.Config{ReloadInterval: -time.Second}, discard); err == nil {
		t.Fatal("negative reload interval accepted")
	}
	if _, err := opa.New(context.Background(), opa.Config{Dir: t.TempDir()}, discard); err == nil {
		t.Fatal("empty dir accepted")
	}
}

func BenchmarkEvaluate(b *testing.B) {
	e, err := opa.New(context.Background(), opa.Config{}, discard)
	if err != nil {
		b.Fatal(err)
	}
	in := input()
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := e.Evaluate(ctx, in); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestHiddenEntriesIgnored lays the policy out the way a Kubernetes
// ConfigMap volume does (real files under a hidden timestamped directory,
// a ..data link, and hidden leftovers) and checks only visible files load.
func TestHiddenEntriesIgnored(t *testing.T) {
	t.Parallel()
	dir := writePolicy(t)
	hiddenDir := filepath.Join(dir, "..2026_11_22_10_00_00.123")
	if err := os.MkdirAll(filepath.Join(hiddenDir, "broken"), 0o755); err != nil {
		t.Fatal(err)
	}
	// Would fail to compile if loaded.
	os.WriteFile(filepath.Join(hiddenDir, "broken", "x.rego"), []byte("package broken\nx := {"), 0o644)
	os.WriteFile(filepath.Join(dir, ".editor-swap.rego"), []byte("not rego"), 0o644)
	if err := os.Symlink(hiddenDir, filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if _, err := opa.New(context.Background(), opa.Config{Dir: dir}, discard); err != nil {
		t.Fatalf("hidden entries were loaded: %v", err)
	}
}
