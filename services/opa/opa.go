// Package opa evaluates the authorization policy with the Open Policy Agent
// Go library. A policy bundle (Rego modules, their *_test.rego tests and
// YAML/JSON data) is compiled once, must pass its own tests to be used, and
// is swapped atomically when a watched directory changes.
package opa

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/loader"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
	"github.com/open-policy-agent/opa/v1/tester"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/cloud-connector/cloud-connector/policies"
	"github.com/cloud-connector/cloud-connector/services/authz"
)

// Config configures an Engine.
type Config struct {
	// Dir is a policy directory that replaces the embedded policies and is
	// reloaded when it changes. Empty: the embedded policies.
	Dir string
	// ReloadInterval is how often Dir is checked for changes. Default 5s.
	ReloadInterval time.Duration
	// Registerer receives the engine's metrics; nil registers none.
	Registerer prometheus.Registerer
}

// Engine evaluates the current policy bundle. It is safe for concurrent use.
type Engine struct {
	cfg     Config
	source  fs.FS
	logger  *slog.Logger
	current atomic.Pointer[compiled]
	reloads *prometheus.CounterVec

	// reloadMu serialises Reload; rejected is the fingerprint of the last
	// bundle that failed, so a broken bundle is compiled and reported once,
	// not on every tick until someone fixes it.
	reloadMu sync.Mutex
	rejected string
}

type compiled struct {
	query       rego.PreparedEvalQuery
	revision    string
	fingerprint string
}

var _ authz.Policy = (*Engine)(nil)

// New loads, compiles and tests the configured bundle. It fails if the
// bundle does not compile or any of its tests fails.
func New(ctx context.Context, cfg Config, logger *slog.Logger) (*Engine, error) {
	switch {
	case cfg.ReloadInterval == 0:
		cfg.ReloadInterval = 5 * time.Second
	case cfg.ReloadInterval < 0:
		return nil, fmt.Errorf("policy reload interval %s: must be positive", cfg.ReloadInterval)
	}
	e := &Engine{
		cfg:    cfg,
		source: policies.FS(),
		logger: logger,
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cloudconnector_policy_reloads_total",
			Help: "Policy bundle loads by result (ok, rejected).",
		}, []string{"result"}),
	}
	if cfg.Dir != "" {
		st, err := os.Stat(cfg.Dir)
		if err != nil {
			return nil, fmt.Errorf("policy dir: %w", err)
		}
		if !st.IsDir() {
			return nil, fmt.Errorf("policy dir %q: not a directory", cfg.Dir)
		}
		e.source = os.DirFS(cfg.Dir)
	}
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(e.reloads)
	}
	fp, err := fingerprint(e.source)
	if err != nil {
		return nil, err
	}
	c, err := compile(ctx, e.source, fp)
	if err != nil {
		return nil, err
	}
	e.current.Store(c)
	e.reloads.WithLabelValues("ok").Inc()
	logger.Info("policy loaded", "revision", c.revision, "dir", cfg.Dir)
	return e, nil
}

// Revision identifies the bundle in use (a hash of its files).
func (e *Engine) Revision() string { return e.current.Load().revision }

// Run reloads the policy directory when its files change, until ctx is
// done. A bundle that fails to compile or fails its tests is rejected and
// the current one keeps serving. With embedded policies it just waits.
func (e *Engine) Run(ctx context.Context) error {
	if e.cfg.Dir == "" {
		<-ctx.Done()
		return nil
	}
	t := time.NewTicker(e.cfg.ReloadInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if err := e.Reload(ctx); err != nil {
				e.logger.Error("policy reload rejected; keeping current policy", "error", err,
					"revision", e.Revision())
			}
		}
	}
}

// Reload loads the bundle again if its files changed and swaps it in when it
// compiles and passes its tests. A bundle already rejected is not tried (or
// reported) again until its files change. Safe for concurrent use.
func (e *Engine) Reload(ctx context.Context) error {
	e.reloadMu.Lock()
	defer e.reloadMu.Unlock()
	fp, err := fingerprint(e.source)
	if err != nil {
		return err
	}
	if fp == e.current.Load().fingerprint || fp == e.rejected {
		return nil
	}
	c, err := compile(ctx, e.source, fp)
	if err != nil {
		if ctx.Err() == nil {
			e.rejected = fp
		}
		e.reloads.WithLabelValues("rejected").Inc()
		return err
	}
	e.rejected = ""
	old := e.current.Swap(c)
	e.reloads.WithLabelValues("ok").Inc()
	e.logger.Info("policy reloaded", "revision", c.revision, "previous", old.revision)
	return nil
}

// Evaluate runs the policy on in.
func (e *Engine) Evaluate(ctx context.Context, in authz.PolicyInput) (authz.PolicyResult, error) {
	c := e.current.Load()
	v, err := ast.InterfaceToValue(inputDoc(in))
	if err != nil {
		return authz.PolicyResult{}, fmt.Errorf("policy input: %w", err)
	}
	rs, err := c.query.Eval(ctx, rego.EvalParsedInput(v))
	if err != nil {
		return authz.PolicyResult{}, fmt.Errorf("evaluate %s: %w", policies.Query, err)
	}
	if len(rs) != 1 || len(rs[0].Expressions) != 1 {
		return authz.PolicyResult{}, fmt.Errorf("evaluate %s: undefined (policy revision %s)", policies.Query, c.revision)
	}
	res, err := parseDecision(rs[0].Expressions[0].Value)
	if err != nil {
		return authz.PolicyResult{}, fmt.Errorf("policy %s: %w", c.revision, err)
	}
	res.Revision = c.revision
	return res, nil
}

func inputDoc(in authz.PolicyInput) map[string]any {
	claims := in.Claims
	if claims == nil {
		claims = map[string]any{}
	}
	org := map[string]any{"registered": false}
	if o := in.Organization; o != nil {
		addOns := make([]any, 0, len(o.AddOns))
		for _, a := range o.AddOns {
			addOns = append(addOns, map[string]any{"name": a.Name, "seats": a.Seats})
		}
		org = map[string]any{"registered": true, "id": o.ID, "name": o.Name, "plan": o.Plan, "add_ons": addOns}
	}
	f := in.Facts
	return map[string]any{
		"token":        claims,
		"organization": org,
		"feature":      in.Feature,
		"audience":     in.Audience,
		"request": map[string]any{
			"method":          f.Method,
			"path":            f.Path,
			"instance_id":     f.InstanceID,
			"realm":           f.Realm,
			"global_user_id":  f.GlobalUserID,
			"gitlab_version":  f.GitLabVersion,
			"client_type":     f.ClientType,
			"deployment_type": f.DeploymentType,
			"host_name":       f.HostName,
		},
		"now": in.Now.UTC().Format(time.RFC3339Nano),
	}
}

func parseDecision(v any) (authz.PolicyResult, error) {
	m, ok := v.(map[string]any)
	if !ok {
		return authz.PolicyResult{}, fmt.Errorf("decision is %T, want an object", v)
	}
	var res authz.PolicyResult
	var errs []error
	res.Allow, ok = m["allow"].(bool)
	if !ok {
		errs = append(errs, errors.New("decision.allow is not a boolean"))
	}
	res.Reason, _ = m["reason"].(string)
	res.Message, _ = m["message"].(string)
	if res.Reason == "" {
		errs = append(errs, errors.New("decision.reason is empty"))
	}
	if ex, ok := m["explanation"].([]any); ok {
		for _, s := range ex {
			if s, ok := s.(string); ok {
				res.Explanation = append(res.Explanation, s)
			}
		}
	}
	if secs, err := number(m["cache_seconds"]); err == nil && secs > 0 {
		res.CacheTTL = time.Duration(secs) * time.Second
	}
	if b, ok := m["budget"].(map[string]any); ok {
		budget, err := parseBudget(b)
		if err != nil {
			errs = append(errs, err)
		}
		res.Budget = budget
	}
	if res.Allow && res.Budget == nil {
		errs = append(errs, errors.New("decision allows without a budget"))
	}
	if err := errors.Join(errs...); err != nil {
		return authz.PolicyResult{}, fmt.Errorf("malformed decision: %w", err)
	}
	return res, nil
}

func parseBudget(b map[string]any) (*authz.Budget, error) {
	limit, err := number(b["limit"])
	if err != nil || limit < 0 {
		return nil, fmt.Errorf("budget.limit %v: want a non-negative integer", b["limit"])
	}
	window, err := number(b["window_seconds"])
	if err != nil || window <= 0 {
		return nil, fmt.Errorf("budget.window_seconds %v: want a positive integer", b["window_seconds"])
	}
	budget := &authz.Budget{Limit: limit, Window: time.Duration(window) * time.Second}
	budget.Bucket, _ = b["bucket"].(string)
	budget.Unit, _ = b["unit"].(string)
	kind, _ := b["kind"].(string)
	budget.Kind = authz.BudgetKind(kind)
	if budget.Bucket == "" || budget.Unit == "" || (budget.Kind != authz.Rate && budget.Kind != authz.Quota) {
		return nil, fmt.Errorf("budget %v: bucket, unit and kind (rate|quota) are required", b)
	}
	return budget, nil
}

func number(v any) (int64, error) {
	n, ok := v.(json.Number)
	if !ok {
		return 0, fmt.Errorf("%v is not a number", v)
	}
	return n.Int64()
}

// compile loads fsys (whose fingerprint is fp), compiles it with the
// decision query prepared, and runs its tests.
func compile(ctx context.Context, fsys fs.FS, fp string) (*compiled, error) {
	res, err := load(fsys)
	if err != nil {
		return nil, err
	}
	if err := runTests(ctx, res); err != nil {
		return nil, err
	}
	// AST values on read: evaluation reads data documents without
	// converting them from Go values every time.
	store, err := res.StoreWithOpts(inmem.OptReturnASTValuesOnRead(true))
	if err != nil {
		return nil, fmt.Errorf("policy data: %w", err)
	}
	opts := []func(*rego.Rego){rego.Query(policies.Query), rego.Store(store)}
	for _, m := range res.ParsedModules() {
		opts = append(opts, rego.ParsedModule(m))
	}
	q, err := rego.New(opts...).PrepareForEval(ctx)
	if err != nil {
		return nil, fmt.Errorf("prepare policy: %w", err)
	}
	revision, err := revisionOf(fsys)
	if err != nil {
		return nil, err
	}
	return &compiled{query: q, revision: revision, fingerprint: fp}, nil
}

func load(fsys fs.FS) (*loader.Result, error) {
	res, err := loader.NewFileLoader().WithFS(fsys).WithRegoVersion(ast.RegoV1).
		Filtered([]string{"."}, func(_ string, info fs.FileInfo, _ int) bool { return hidden(info.Name()) })
	if err != nil {
		return nil, fmt.Errorf("load policy: %w", err)
	}
	if len(res.Modules) == 0 {
		return nil, errors.New("load policy: no Rego modules")
	}
	return res, nil
}

// Test runs the *_test.rego tests of the bundle in fsys and returns every
// result.
func Test(ctx context.Context, fsys fs.FS) ([]*tester.Result, error) {
	res, err := load(fsys)
	if err != nil {
		return nil, err
	}
	return testResults(ctx, res)
}

func testResults(ctx context.Context, res *loader.Result) ([]*tester.Result, error) {
	store, err := res.Store()
	if err != nil {
		return nil, fmt.Errorf("policy data: %w", err)
	}
	ch, err := tester.NewRunner().SetStore(store).SetTimeout(30*time.Second).Run(ctx, res.ParsedModules())
	if err != nil {
		return nil, fmt.Errorf("run policy tests: %w", err)
	}
	var out []*tester.Result
	for r := range ch {
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func runTests(ctx context.Context, res *loader.Result) error {
	results, err := testResults(ctx, res)
	if err != nil {
		return err
	}
	var failed []string
	for _, r := range results {
		if !r.Pass() && !r.Skip {
			failed = append(failed, fmt.Sprintf("%s.%s", r.Package, r.Name))
		}
	}
	if len(results) == 0 {
		return errors.New("policy has no tests")
	}
	if len(failed) > 0 {
		return fmt.Errorf("policy tests failed: %s", strings.Join(failed, ", "))
	}
	return nil
}

// revisionOf hashes every file's path and content.
func revisionOf(fsys fs.FS) (string, error) {
	h := sha256.New()
	err := walkFiles(fsys, func(path string, _ fs.FileInfo) error {
		b, err := fs.ReadFile(fsys, path)
		if err != nil {
			return err
		}
		fmt.Fprintf(h, "%s\x00%d\x00", path, len(b))
		h.Write(b)
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("hash policy: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil))[:12], nil
}

// fingerprint is a cheap change detector: paths, sizes and mtimes.
func fingerprint(fsys fs.FS) (string, error) {
	h := sha256.New()
	err := walkFiles(fsys, func(path string, info fs.FileInfo) error {
		fmt.Fprintf(h, "%s\x00%d\x00%d\x00", path, info.Size(), info.ModTime().UnixNano())
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("scan policy: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// walkFiles calls fn for every policy file, skipping hidden entries (such
// as Kubernetes' ..data bookkeeping in ConfigMap volumes). File info
// follows symlinks, so a swapped link target counts as a change.
func walkFiles(fsys fs.FS, fn func(string, fs.FileInfo) error) error {
	return fs.WalkDir(fsys, ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path != "." && hidden(d.Name()) {
			if d.IsDir() {
				return fs.SkipDir
			}
			return nil
		}
		if d.IsDir() {
			return nil
		}
		if !strings.HasSuffix(path, ".rego") && !strings.HasSuffix(path, ".yaml") &&
			!strings.HasSuffix(path, ".yml") && !strings.HasSuffix(path, ".json") {
			return nil
		}
		info, err := fs.Stat(fsys, path)
		if err != nil {
			return err
		}
		return fn(path, info)
	})
}

func hidden(name string) bool { return name != "." && strings.HasPrefix(name, ".") }
