package server_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/cloud-connector/cloud-connector/services/server"
	"github.com/cloud-connector/cloud-connector/services/server/servertest"
)

// blocking is a handler whose requests to /slow wait for release; entered
// receives one value per request that arrived.
type blocking struct {
	entered chan struct{}
	release chan struct{}
}

func (b *blocking) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/slow" {
		io.WriteString(w, "fast\n")
		return
	}
	b.entered <- struct{}{}
	<-b.release
	io.WriteString(w, "done\n")
}

type proc struct {
	p    *server.Process
	h    *blocking
	logs *servertest.Buffer
}

func newProc(t *testing.T, drain time.Duration, checks ...server.Check) proc {
	t.Helper()
	h := &blocking{entered: make(chan struct{}, 8), release: make(chan struct{})}
	logs := &servertest.Buffer{}
	logger := slog.New(slog.NewJSONHandler(logs, nil))
	p, err := server.NewProcess("127.0.0.1:0", "127.0.0.1:0", drain, h, server.NewRegistry(), logger, checks...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("process logs:\n%s", logs)
		}
	})
	return proc{p: p, h: h, logs: logs}
}

func get(t *testing.T, url string) (int, string, error) {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	res, err := c.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	return res.StatusCode, string(b), err
}

func mustGet(t *testing.T, url string) (int, string) {
	t.Helper()
	code, body, err := get(t, url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return code, body
}

// refused reports whether a new connection to addr is refused.
func refused(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return true
	}
	c.Close()
	return false
}

// TestProcessShutdown follows a shutdown step by step: readiness fails
// while the public port still accepts, then the public port refuses new
// connections while an in-flight request completes and the admin port keeps
// answering, and only then does the admin port close.
func TestProcessShutdown(t *testing.T) {
	t.Parallel()
	pr := newProc(t, time.Minute)
	public, admin := "http://"+pr.p.Addr(), "http://"+pr.p.AdminAddr()

	type atDrain struct {
		readyz        int
		publicRefused bool
	}
	drainSeen := make(chan atDrain, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- pr.p.Run(ctx, func() {
			code, _, _ := get(t, admin+"/readyz")
			drainSeen <- atDrain{readyz: code, publicRefused: refused(pr.p.Addr())}
		})
	}()

	if code, body := mustGet(t, admin+"/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz while serving = %d %s", code, body)
	}
	if code, body := mustGet(t, public+"/fast"); code != http.StatusOK || body != "fast\n" {
		t.Fatalf("public GET = %d %q", code, body)
	}

	type response struct {
		code int
		body string
		err  error
	}
	inFlight := make(chan response, 1)
	go func() {
		code, body, err := get(t, public+"/slow")
		inFlight <- response{code, body, err}
	}()
	<-pr.h.entered

	cancel()
	at := <-drainSeen
	if at.readyz != http.StatusServiceUnavailable {
		t.Errorf("/readyz when the drain starts = %d; want 503", at.readyz)
	}
	if at.publicRefused {
		t.Error("the public port refused connections before readiness failed")
	}

	// The drain: no new connections, the in-flight request still runs and
	// the admin port still answers (not ready).
	for !refused(pr.p.Addr()) {
		select {
		case err := <-done:
			t.Fatalf("Run returned %v with a request in flight", err)
		default:
			time.Sleep(5 * time.Millisecond)
		}
	}
	if code, body := mustGet(t, admin+"/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "shutting down") {
		t.Errorf("/readyz during the drain = %d %s; want 503 shutting down", code, body)
	}
	select {
	case r := <-inFlight:
		t.Fatalf("in-flight request ended before it was released: %+v", r)
	default:
	}

	close(pr.h.release)
	if r := <-inFlight; r.err != nil || r.code != http.StatusOK || r.body != "done\n" {
		t.Errorf("in-flight request = %d %q %v; want 200 done", r.code, r.body, r.err)
	}
	if err := <-done; err != nil {
		t.Errorf("Run = %v; want nil after a complete drain", err)
	}
	for _, addr := range []string{pr.p.Addr(), pr.p.AdminAddr()} {
		if !refused(addr) {
			t.Errorf("%s accepts connections after Run returned", addr)
		}
	}
	logs := pr.logs.String()
	for _, want := range []string{`"msg":"drain started"`, `"msg":"drain finished"`} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %s:\n%s", want, logs)
		}
	}
}

// TestProcessDrainCut checks that a request still running when the drain
// window ends is cut and reported.
func TestProcessDrainCut(t *testing.T) {
	t.Parallel()
	pr := newProc(t, 10*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- pr.p.Run(ctx, nil) }()
	inFlight := make(chan error, 1)
	go func() {
		_, _, err := get(t, "http://"+pr.p.Addr()+"/slow")
		inFlight <- err
	}()
	<-pr.h.entered
	cancel()
	err := <-done
	close(pr.h.release)
	if err == nil || !strings.Contains(err.Error(), "cut") {
		t.Errorf("Run = %v; want the in-flight request reported as cut", err)
	}
	if err := <-inFlight; err == nil {
		t.Error("the cut request completed")
	}
}

// TestProcessReadiness checks that readiness runs the given checks and
// reports the failures by name.
func TestProcessReadiness(t *testing.T) {
	t.Parallel()
	fail := errors.New("warming up")
	pr := newProc(t, time.Second, server.Check{Name: "cache", Fn: func(context.Context) error { return fail }})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- pr.p.Run(ctx, nil) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	code, body := mustGet(t, "http://"+pr.p.AdminAddr()+"/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, `"cache":"warming up"`) {
		t.Errorf("/readyz = %d %s; want 503 naming the cache check", code, body)
	}
	if code, _ := mustGet(t, "http://"+pr.p.AdminAddr()+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz = %d; want 200 whatever readiness says", code)
	}
}
