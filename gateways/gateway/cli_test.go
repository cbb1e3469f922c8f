package gateway_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cloud-connector/cloud-connector/gateways/gateway"
	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
)

func TestRunCommand(t *testing.T) {
	t.Parallel()
	dbURL := pgtest.URL(t)
	dir := t.TempDir()
	const valid = `listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
prefix: /ai
database_url: "::not a url"
backends:
  ai_gateway: {url: "http://127.0.0.1:1", audience: gitlab-ai-gateway}
  duo_workflow: {url: "http://127.0.0.1:2", audience: gitlab-duo-workflow-service, http2: true}
`
	file := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good, typo := file("good.yaml", valid), file("typo.yaml", valid+"prefx: /ai\n")
	routes := file("routes.yaml", "routes:\n  - {name: r, path: /r, feature: complete_code, backend: ai_gateway}\n")
	negativeReload := file("reload.yaml", valid+"routes_file: "+routes+"\nroutes_reload_interval: \"-5s\"\n")
	urlHost := file("host.yaml", valid+"hosts: [\"https://ai.cloud.example.com\"]\n")
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	withDB := env(map[string]string{"DATABASE_URL": dbURL, "DECISION_URL": "http://127.0.0.1:3"})
	stopped, cancel := context.WithCancel(context.Background())
	cancel() // Run returns as soon as it has started

	for _, tc := range []struct {
		name    string
		gw      string
		args    []string
		getenv  func(string) string
		wantErr string // "" means success
	}{
		{"runs and stops", "ai", []string{"-config", good, "-log-level", "warn"}, withDB, ""},
		{"config from environment", "ai", nil, env(map[string]string{
			"CONFIG_FILE": good, "DATABASE_URL": dbURL, "DECISION_URL": "http://127.0.0.1:3", "LOG_LEVEL": "error",
		}), ""},
		{"database url from file is used without env", "ai", []string{"-config", good},
			env(map[string]string{"DECISION_URL": "http://127.0.0.1:3"}), "database"},
		{"decision url required", "ai", []string{"-config", good}, env(map[string]string{"DATABASE_URL": dbURL}), "decision_url"},
		{"unknown field", "ai", []string{"-config", typo}, withDB, "prefx"},
		{"missing config", "ai", []string{"-config", filepath.Join(dir, "none.yaml")}, withDB, "read config"},
		{"bad flag", "ai", []string{"-nope"}, withDB, "flag provided but not defined"},
		{"extra args", "ai", []string{"-config", good, "serve"}, withDB, "unexpected arguments"},
		// Once a panic in the reload loop, after the gateway said it was listening.
		{"negative reload interval", "ai", []string{"-config", negativeReload}, withDB, "routes_reload_interval"},
		{"host given as a URL", "ai", []string{"-config", urlHost}, withDB, "hosts"},
		{"decision url without scheme", "ai", []string{"-config", good},
			env(map[string]string{"DATABASE_URL": dbURL, "DECISION_URL": "decision:8080"}), "decision_url"},
		{"bad log level", "ai", []string{"-config", good, "-log-level", "loud"}, withDB, "log level"},
		{"no built-in routes", "nope", []string{"-config", good}, withDB, "no built-in routes"},
		{"backends missing for the built-in routes", "cicd", []string{"-config", good}, withDB, "unknown backend"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stderr bytes.Buffer
			err := gateway.RunCommand(stopped, tc.gw, tc.args, tc.getenv, &stderr)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("RunCommand: %v\n%s", err, stderr.String())
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("RunCommand error = %v; want one containing %q", err, tc.wantErr)
			}
		})
	}
}
