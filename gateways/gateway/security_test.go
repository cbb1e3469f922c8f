package gateway_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cloud-connector/cloud-connector/gateways/gateway"
	"github.com/cloud-connector/cloud-connector/gateways/route"
)

// tunnelBackend switches protocols for any upgrade request that reaches
// it, as an h2c-capable server would, then serves whatever arrives on the
// raw connection (an echo is enough to prove the tunnel). Other requests
// get the echo backend.
type tunnelBackend struct {
	mu       sync.Mutex
	upgrades []string // "path upgrade-value" of upgrade requests that reached it
}

func (b *tunnelBackend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	proto := r.Header.Get("Upgrade")
	if proto == "" {
		echo("main")(w, r)
		return
	}
	b.mu.Lock()
	b.upgrades = append(b.upgrades, r.URL.Path+" "+proto)
	b.mu.Unlock()
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		http.Error(w, "hijack: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer conn.Close()
	fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n\r\n", proto)
	if brw.Flush() != nil {
		return
	}
	for {
		line, err := brw.ReadString('\n')
		if err != nil {
			return
		}
		brw.WriteString("tunnel:" + line)
		if brw.Flush() != nil {
			return
		}
	}
}

func (b *tunnelBackend) seen() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.upgrades)
}

// tunnelRoutes adds routes on which upgrades are tried: one that accepts
// WebSocket, one that does not, and one that accepts WebSocket on any
// method.
func tunnelRoutes(c *gateway.Config) {
	c.Routes.Routes = append(c.Routes.Routes,
		route.Route{Name: "tunnel_ws", Path: "/v1/tunnel", Methods: []string{"GET"}, Feature: "duo_chat", Backend: "main", WebSocket: true},
		route.Route{Name: "tunnel_plain", Path: "/v1/tunnel-plain", Methods: []string{"GET"}, Feature: "duo_chat", Backend: "main"},
		route.Route{Name: "tunnel_any", Path: "/v1/tunnel-any", Feature: "duo_chat", Backend: "main", WebSocket: true},
	)
}

// handshake sends a bodyless request with the GitLab headers (none when
// token is empty) and the extra header lines on a connection of its own,
// and reads the response head.
func (e *env) handshake(tb testing.TB, method, path, token string, extra ...string) (net.Conn, *bufio.Reader, *http.Response) {
	tb.Helper()
	conn, err := net.Dial("tcp", e.g.Addr())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(30 * time.Second)) // a hang fails, not stalls, the test
	head := method + " " + e.cfg.Prefix + path + " HTTP/1.1\r\nHost: " + e.g.Addr() + "\r\n"
	if token != "" {
		head += "Authorization: Bearer " + token + "\r\nX-Gitlab-Authentication-Type: oidc\r\n" +
			"X-Gitlab-Instance-Id: " + instanceID + "\r\nX-Gitlab-Realm: " + realm + "\r\n"
	}
	for _, h := range extra {
		head += h + "\r\n"
	}
	if _, err := io.WriteString(conn, head+"\r\n"); err != nil {
		tb.Fatal(err)
	}
	br := bufio.NewReader(conn)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		tb.Fatalf("read response to %s %s: %v", method, path, err)
	}
	return conn, br, res
}

// TestUpgradeSmuggling: only a WebSocket upgrade, on an authorized route
// that opts in, may switch protocols. Anything else (h2c above all: an
// h2c-capable backend serves any path with any headers on the tunnel) is
// refused before the decision service, the budget or the backend sees it.
func TestUpgradeSmuggling(t *testing.T) {
	t.Parallel()
	backend := &tunnelBackend{}
	e := setup(t, options{handler: backend, configure: tunnelRoutes})
	const h2cSettings = "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA"
	ws := []string{"Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="}

	for _, tc := range []struct {
		name, method, path, token string
		extra                     []string
	}{
		{"h2c on a public route", "GET", "/v1/models/definitions", "",
			[]string{"Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", h2cSettings}},
		{"websocket on a public route", "GET", "/v1/models/definitions", "", ws},
		{"h2c on a websocket route", "GET", "/v1/tunnel", "allow",
			[]string{"Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", h2cSettings}},
		{"websocket on a route that did not opt in", "GET", "/v1/tunnel-plain", "allow", ws},
		{"websocket among other tokens", "GET", "/v1/tunnel", "allow", []string{"Connection: Upgrade", "Upgrade: websocket, h2c"}},
		{"h2c before websocket", "GET", "/v1/tunnel", "allow", []string{"Connection: Upgrade", "Upgrade: h2c, websocket"}},
		{"two Upgrade fields", "GET", "/v1/tunnel", "allow", []string{"Connection: Upgrade", "Upgrade: websocket", "Upgrade: h2c"}},
		{"websocket with a version", "GET", "/v1/tunnel", "allow", []string{"Connection: Upgrade", "Upgrade: websocket/13"}},
		{"websocket by POST", "POST", "/v1/tunnel-any", "allow", append(slices.Clone(ws), "Content-Length: 0")},
		{"Upgrade without Connection", "GET", "/v1/models/definitions", "", []string{"Upgrade: h2c", h2cSettings}},
		{"other protocol", "GET", "/v1/tunnel", "allow", []string{"Connection: keep-alive, Upgrade", "Upgrade: TLS/1.2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := e.fake.count()
			conn, br, res := e.handshake(t, tc.method, tc.path, tc.token, tc.extra...)
			if res.StatusCode == http.StatusSwitchingProtocols {
				// Show what the tunnel gives an attacker before failing.
				io.WriteString(conn, "GET /admin HTTP/1.1\n")
				line, _ := br.ReadString('\n')
				t.Fatalf("BUG: gateway/handler.go proxied %q (Upgrade %q) as a protocol switch: the client got 101 and a raw "+
					"tunnel to the backend (it answered %q), with no decision, budget or route per request",
					tc.name, res.Header.Get("Upgrade"), line)
			}
			body, _ := io.ReadAll(res.Body)
			wantJSON(t, result{status: res.StatusCode, header: res.Header, body: body}, http.StatusBadRequest,
				map[string]any{"detail": "Protocol upgrade not supported"})
			if !res.Close {
				t.Error("a refused upgrade leaves the connection open; want Connection: close so nothing the client " +
					"sent after the handshake is read as a request")
			}
			if n := e.fake.count(); n != calls {
				t.Errorf("decision calls for a refused upgrade = %d; want none", n-calls)
			}
		})
	}
	if got := backend.seen(); len(got) > 0 {
		t.Errorf("backend saw upgrade requests %q; want none of the refused ones", got)
	}

	for _, up := range []string{"websocket", "WebSocket"} {
		t.Run("allowed "+up, func(t *testing.T) {
			before := len(backend.seen())
			conn, br, res := e.handshake(t, "GET", "/v1/tunnel", "allow", "Connection: keep-alive, Upgrade", "Upgrade: "+up)
			if res.StatusCode != http.StatusSwitchingProtocols {
				body, _ := io.ReadAll(res.Body)
				t.Fatalf("status = %d (%s); want 101", res.StatusCode, body)
			}
			io.WriteString(conn, "hello\n")
			if line, err := br.ReadString('\n'); err != nil || line != "tunnel:hello\n" {
				t.Fatalf("through the WebSocket: %q, %v", line, err)
			}
			if got := backend.seen(); len(got) != before+1 || got[before] != "/v1/tunnel "+up {
				t.Errorf("backend saw upgrades %q; want one more for /v1/tunnel %s", got, up)
			}
		})
	}
	t.Run("denied websocket", func(t *testing.T) {
		_, _, res := e.handshake(t, "GET", "/v1/tunnel", "unauth", ws...)
		body, _ := io.ReadAll(res.Body)
		wantJSON(t, result{status: res.StatusCode, header: res.Header, body: body}, http.StatusUnauthorized,
			map[string]any{"error": "Forbidden by auth provider"})
	})
	t.Run("bare Connection upgrade", func(t *testing.T) {
		// nginx set up for WebSocket sends "Connection: upgrade" on every
		// request; without an Upgrade field it asks for nothing.
		r := e.raw(t, rawRequest("POST", "/ai/v2/code/completions", "allow", "Connection: upgrade"))
		if r.status != http.StatusOK || r.seen(t).Header.Get("Upgrade") != "" {
			t.Errorf("status %d body %s; want 200 from the backend without Upgrade", r.status, r.body)
		}
	})
	t.Run("plain request on a websocket route", func(t *testing.T) {
		r := e.do(t, e.newRequest(t, http.MethodGet, "/v1/tunnel", "allow", nil))
		if r.status != http.StatusOK || r.seen(t).Header.Get("Upgrade") != "" {
			t.Errorf("status %d body %s; want 200 from the backend without Upgrade", r.status, r.body)
		}
	})
}

// spoofedHeaders are request headers with which a client could pose as
// someone else (an address, a host, a scheme, a user) or ask for another
// URL or method, for backends or frameworks that trust them.
var spoofedHeaders = []string{
	"Forwarded", "X-Real-Ip",
	"X-Forwarded-Prefix", "X-Forwarded-Port", "X-Forwarded-Server", "X-Forwarded-Ssl", "X-Forwarded-Scheme",
	"X-Forwarded-Uri", "X-Forwarded-Path", "X-Forwarded-Client-Cert", "X-Forwarded-User", "X-Forwarded-Email",
	"X-Forwarded-Access-Token", "X-Forwarded-Groups", "X-Forwarded-Tenant",
	"X-Original-Url", "X-Original-Uri", "X-Rewrite-Url", "X-Original-Forwarded-For", "X-Original-Host",
	"True-Client-Ip", "X-Client-Ip", "Cf-Connecting-Ip", "X-Cluster-Client-Ip", "Client-Ip", "Fastly-Client-Ip",
	"X-Http-Method-Override", "X-Http-Method", "X-Method-Override",
}

// TestClientForwardingHeadersStripped: the backend gets forwarding and
// client-address headers from the gateway only: from an untrusted peer
// every such header is replaced, and even a trusted proxy passes on only
// the address chain, host and scheme, which the gateway sets itself.
func TestClientForwardingHeadersStripped(t *testing.T) {
	t.Parallel()
	for _, trusted := range []bool{false, true} {
		t.Run(fmt.Sprintf("trusted=%v", trusted), func(t *testing.T) {
			t.Parallel()
			e := setup(t, options{configure: func(c *gateway.Config) {
				if trusted {
					c.TrustedProxies = []string{"127.0.0.0/8"}
				}
			}})
			req := e.newRequest(t, http.MethodPost, "/v2/code/completions", "allow", strings.NewReader("{}"))
			for _, h := range spoofedHeaders {
				req.Header.Set(h, "203.0.113.9")
			}
			req.Header["x-forwarded-lowercase"] = []string{"1"} // the server canonicalizes names
			req.Header.Set("X-Forwarded-For", "203.0.113.9")
			req.Header.Set("X-Forwarded-Host", "cloud.gitlab.com")
			req.Header.Set("X-Forwarded-Proto", "https")
			r := e.do(t, req)
			if r.status != http.StatusOK {
				t.Fatalf("status = %d (%s); want 200", r.status, r.body)
			}
			s := r.seen(t)
			want := map[string]string{"X-Forwarded-For": "127.0.0.1", "X-Forwarded-Host": e.g.Addr(), "X-Forwarded-Proto": "http"}
			if trusted {
				want = map[string]string{"X-Forwarded-For": "203.0.113.9, 127.0.0.1", "X-Forwarded-Host": "cloud.gitlab.com", "X-Forwarded-Proto": "https"}
			}
			for k, v := range want {
				if got := s.Header.Values(k); !slices.Equal(got, []string{v}) {
					t.Errorf("backend header %s = %q; want [%q]", k, got, v)
				}
			}
			var leaked []string
			for k, v := range s.Header {
				if _, set := want[k]; set {
					continue
				}
				if slices.Contains(spoofedHeaders, k) || strings.HasPrefix(k, "X-Forwarded-") {
					leaked = append(leaked, k+": "+strings.Join(v, ","))
				}
			}
			if len(leaked) > 0 {
				slices.Sort(leaked)
				t.Errorf("BUG: gateway/proxy.go Rewrite passes client-supplied forwarding headers to the backend: %q", leaked)
			}
			if s.Method != http.MethodPost {
				t.Errorf("backend method = %s; want POST", s.Method)
			}
		})
	}
}

// TestConnectionCannotStripGatewayHeaders: naming a header in Connection
// makes it hop-by-hop, so the proxy removes it. The gateway's own headers,
// and the request headers its decision depended on, must reach the backend
// all the same.
func TestConnectionCannotStripGatewayHeaders(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	req := e.newRequest(t, http.MethodPost, "/v1/prompts/x", "allow", strings.NewReader("{}"))
	req.Header.Set("X-Gitlab-Unit-Primitive", "duo_chat")
	req.Header.Set("X-Request-Id", "req-conn")
	named := []string{
		"X-Cloud-Connector-Organization-Id", "X-Cloud-Connector-Instance-Id", "X-Cloud-Connector-Realm",
		"X-Cloud-Connector-Plan", "X-Cloud-Connector-Feature", "X-Cloud-Connector-Gateway", "X-Request-Id",
		"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto",
		"Authorization", "X-Gitlab-Authentication-Type", "X-Gitlab-Instance-Id", "X-Gitlab-Realm", "X-Gitlab-Version",
		"X-Gitlab-Unit-Primitive",
	}
	req.Header.Set("Connection", strings.Join(named, ", "))
	r := e.do(t, req)
	if r.status != http.StatusOK {
		t.Fatalf("status = %d (%s); want 200", r.status, r.body)
	}
	s := r.seen(t)
	for k, want := range map[string]string{
		"X-Cloud-Connector-Organization-Id": orgID,
		"X-Cloud-Connector-Instance-Id":     instanceID,
		"X-Cloud-Connector-Realm":           realm,
		"X-Cloud-Connector-Plan":            plan,
		"X-Cloud-Connector-Feature":         "duo_chat",
		"X-Cloud-Connector-Gateway":         "ai",
		"X-Request-Id":                      "req-conn",
		"X-Forwarded-For":                   "127.0.0.1",
		"X-Forwarded-Host":                  e.g.Addr(),
		"X-Forwarded-Proto":                 "http",
		"Authorization":                     "Bearer allow",
		"X-Gitlab-Authentication-Type":      "oidc",
		"X-Gitlab-Instance-Id":              instanceID,
		"X-Gitlab-Realm":                    realm,
		"X-Gitlab-Version":                  "17.6.0",
		"X-Gitlab-Unit-Primitive":           "duo_chat",
	} {
		if got := s.Header.Values(k); !slices.Equal(got, []string{want}) {
			t.Errorf("backend header %s = %q; want [%q] though the client named it in Connection", k, got, want)
		}
	}
}

// TestUndeclaredTrailers: a backend may send trailers it never announced
// (gRPC over HTTP/2 always does; HTTP/1.1 handlers do with
// http.TrailerPrefix). Internal ones never reach the client and the units
// they report are metered, whichever protocol either side speaks.
func TestUndeclaredTrailers(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, path string
		announce   bool // the backend announces X-Checksum, not the internal ones
		client2    bool // the client speaks HTTP/2 to the gateway
	}{
		{"http1 backend", "/v2/chat/agent", false, false},
		{"h2c backend", "/v1/stream-h2", false, false},
		{"h2c backend to http2 client", "/v1/stream-h2", false, true},
		{"h2c backend announcing some", "/v1/stream-h2", true, false},
		{"http1 backend announcing some", "/v2/chat/agent", true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			backend := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.Copy(io.Discard, r.Body)
				w.Header().Set("Content-Type", "application/x-ndjson")
				if tc.announce {
					w.Header().Set("Trailer", "X-Checksum")
				}
				io.WriteString(w, "{\"type\":\"start\"}\n")
				http.NewResponseController(w).Flush()
				io.WriteString(w, "{\"type\":\"end\"}\n")
				if tc.announce {
					w.Header().Set("X-Checksum", "abc")
				} else {
					w.Header().Set(http.TrailerPrefix+"X-Checksum", "abc")
				}
				w.Header().Set(http.TrailerPrefix+"X-Cloud-Connector-Units", "9")
				w.Header().Set(http.TrailerPrefix+"X-Cloud-Connector-Secret", "backend only")
			})
			e := setup(t, options{handler: backend})
			client := e.client
			if tc.client2 {
				client = h2cClient(t)
			}
			res, err := client.Do(e.newRequest(t, http.MethodPost, tc.path, "allow", strings.NewReader("{}")))
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(res.Body)
			res.Body.Close()
			if err != nil || res.StatusCode != http.StatusOK || string(body) != "{\"type\":\"start\"}\n{\"type\":\"end\"}\n" {
				t.Fatalf("status %d body %q, %v; want 200 and both lines", res.StatusCode, body, err)
			}
			if got := res.Trailer.Get("X-Checksum"); got != "abc" {
				t.Errorf("trailer X-Checksum = %q; want abc passed through", got)
			}
			var leaked []string
			for k, v := range res.Trailer {
				if strings.HasPrefix(strings.ToLower(k), "x-cloud-connector-") {
					leaked = append(leaked, k+": "+strings.Join(v, ","))
				}
			}
			if len(leaked) > 0 {
				t.Errorf("BUG: gateway/proxy.go filters only trailers announced in the response head; undeclared trailers %q reach the client", leaked)
			}
			e.stopped(t)
			if rows := e.usage(t); len(rows) != 1 || rows[0].Units == nil || *rows[0].Units != 9 {
				t.Errorf("usage rows %+v; want one with the 9 units the backend reported in an undeclared trailer", rows)
			}
		})
	}
}
