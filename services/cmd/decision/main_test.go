package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
)

func TestRun(t *testing.T) {
	t.Parallel()
	dbURL := pgtest.URL(t)
	config := filepath.Join(t.TempDir(), "decision.yaml")
	if err := os.WriteFile(config, []byte(`listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
token:
  issuers:
    - issuer: https://customers.example.com
      audiences: [gitlab-ai-gateway]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	env := func(k string) string {
		if k == "DATABASE_URL" {
			return dbURL
		}
		return ""
	}
	for _, tc := range []struct {
		name       string
		args       []string
		getenv     func(string) string
		wantErr    string // "" means success
		wantStdout []string
	}{
		{"migrate", []string{"migrate"}, env, "", []string{"schema at version"}},
		{"flags before migrate", []string{"-config", config, "migrate"}, env, "", []string{"schema at version"}},
		{"flags after migrate", []string{"migrate", "-config", config, "-log-level", "warn"}, env, "", []string{"schema at version"}},
		{"serve", []string{"serve", "-config", config}, env, "", nil},
		{"flags before serve", []string{"-config", config, "serve"}, env, "", nil},
		{"serve by default", []string{"-config", config}, env, "", nil},
		{"help", []string{"-h"}, env, "", []string{"serve", "migrate", "DATABASE_URL", "CONFIG_FILE", "LOG_LEVEL", "-config"}},
		{"help after the command", []string{"migrate", "-help"}, env, "", []string{"serve", "migrate"}},

		{"extra argument after serve", []string{"serve", "extra"}, env, `unexpected arguments ["extra"]`, nil},
		{"extra argument after flags", []string{"serve", "-config", config, "extra"}, env, `unexpected arguments ["extra"]`, nil},
		{"two commands", []string{"-config", config, "migrate", "serve"}, env, `unexpected arguments ["serve"]`, nil},
		{"unknown command", []string{"-config", config, "migrat"}, env, `unknown command "migrat"`, nil},
		{"bad flag", []string{"migrate", "-nope"}, env, "flag provided but not defined", nil},
		{"migrate without a database", []string{"migrate"}, func(string) string { return "" }, "DATABASE_URL", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			// serve stops as soon as it listens.
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			var stdout bytes.Buffer
			stderr := &stopWhenListening{cancel: cancel}
			err := run(ctx, tc.args, tc.getenv, &stdout, stderr)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("run(%q): %v\n%s", tc.args, err, stderr.String())
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("run(%q) error = %v; want one containing %q", tc.args, err, tc.wantErr)
			}
			for _, want := range tc.wantStdout {
				if !strings.Contains(stdout.String(), want) {
					t.Errorf("run(%q) stdout lacks %q:\n%s", tc.args, want, stdout.String())
				}
			}
		})
	}
}

// stopWhenListening collects a process's logs and cancels its context once
// it logs that it is listening.
type stopWhenListening struct {
	cancel context.CancelFunc
	mu     sync.Mutex
	b      bytes.Buffer
}

func (w *stopWhenListening) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if bytes.Contains(p, []byte("listening")) {
		w.cancel()
	}
	return w.b.Write(p)
}

func (w *stopWhenListening) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}
