package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloud-connector/cloud-connector/gateways/internaltoken"
	"github.com/cloud-connector/cloud-connector/migrations/pgtest"
	"github.com/cloud-connector/cloud-connector/services/server/servertest"
)

// TestPrintedCommandsWork starts the stack as README's first command does
// and runs the curl commands it prints, exactly as printed, with bash.
func TestPrintedCommandsWork(t *testing.T) {
	t.Parallel()
	for _, tool := range []string{"bash", "curl"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s is required: %v", tool, err)
			}
			t.Skipf("%s not installed", tool)
		}
	}
	dbURL := pgtest.URL(t)
	ctx, cancel := context.WithCancel(context.Background())
	var stdout, stderr servertest.Buffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"-addr", "127.0.0.1:0"}, func(k string) string {
			if k == "DATABASE_URL" {
				return dbURL
			}
			return ""
		}, &stdout, &stderr)
	}()
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(stdout.String(), "# Refused (401)") {
		select {
		case err := <-done:
			t.Fatalf("devstack exited before it was ready: %v\n%s", err, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("devstack not ready after 60s\nstdout:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}

	out := stdout.String()
	script := out[strings.Index(out, "export TOKEN="):]
	// Run each printed command on its own to check each answer.
	parts := strings.Split(script, "\n# ")
	setup := parts[0]
	checks := []struct{ title, want string }{
		{"Code completion (JSON)", `"choices":[{`},
		{"Code completion streamed", "data: \" ==\""},
		{"Refused (401)", `{"error":"Forbidden by auth provider"}`},
	}
	if len(parts) != len(checks)+1 {
		t.Fatalf("printed %d commands, want %d:\n%s", len(parts)-1, len(checks), script)
	}
	for i, c := range checks {
		cmd := parts[i+1]
		if !strings.HasPrefix(cmd, c.title) {
			t.Fatalf("command %d is %q, want %q", i, strings.SplitN(cmd, "\n", 2)[0], c.title)
		}
		res, err := exec.Command("bash", "-c", setup+"\n# "+cmd).CombinedOutput()
		if err != nil || !strings.Contains(string(res), c.want) {
			t.Errorf("%s: %v\n%s\nwant output containing %q", c.title, err, res, c.want)
		}
	}
	if streamed := string(must(exec.Command("bash", "-c", setup+"\n# "+parts[2]).Output())); strings.Count(streamed, "data: ") < 5 {
		t.Errorf("stream arrived as %d events, want one per token:\n%s", strings.Count(streamed, "data: "), streamed)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("run returned %v on Ctrl-C\n%s", err, stderr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("devstack did not stop within 60s of Ctrl-C")
	}
}

func must(b []byte, err error) []byte {
	if err != nil {
		return []byte(err.Error())
	}
	return b
}

// TestDemoBackendRequiresInternalToken checks the demo backend refuses what
// did not come through a gateway, so the stack shows a backend relying on
// the internal token rather than on headers.
func TestDemoBackendRequiresInternalToken(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	key, other := filepath.Join(dir, "key.pem"), filepath.Join(dir, "other.pem")
	for _, k := range []string{key, other} {
		if err := internaltoken.WriteKeyFile(k); err != nil {
			t.Fatal(err)
		}
	}
	keys, err := internaltoken.PublicKeys(key)
	if err != nil {
		t.Fatal(err)
	}
	const iss = "http://127.0.0.1:8080/ai"
	srv := httptest.NewServer(demoBackend(keys, []tokenFor{{iss, aiAudience}}))
	t.Cleanup(srv.Close)
	sign := func(file, issuer, aud string) string {
		s, err := internaltoken.New(internaltoken.Config{Issuer: issuer, KeyFiles: []string{file}})
		if err != nil {
			t.Fatal(err)
		}
		tok, err := s.Token(internaltoken.Claims{Audience: aud, Subject: demoInstance, Feature: "complete_code"})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	for _, tc := range []struct {
		name, method, path, token string
		want                      int
	}{
		{"valid", "POST", "/v2/code/completions", sign(key, iss, aiAudience), http.StatusOK},
		{"none", "POST", "/v2/code/completions", "", http.StatusUnauthorized},
		{"other key", "POST", "/v2/code/completions", sign(other, iss, aiAudience), http.StatusUnauthorized},
		{"other audience", "POST", "/v2/code/completions", sign(key, iss, cicdAudience), http.StatusUnauthorized},
		{"other issuer", "POST", "/v2/code/completions", sign(key, "http://127.0.0.1:8080/cicd", aiAudience), http.StatusUnauthorized},
		{"public path", "GET", "/v1/models/definitions", "", http.StatusOK},
	} {
		req, _ := http.NewRequest(tc.method, srv.URL+tc.path, strings.NewReader(`{"current_file":{"file_name":"a.py"}}`))
		if tc.token != "" {
			req.Header.Set(internaltoken.Header, tc.token)
		}
		res, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != tc.want {
			t.Errorf("%s: status %d; want %d", tc.name, res.StatusCode, tc.want)
		}
	}
}
