package gateway_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/cloud-connector/cloud-connector/gateways/gateway"
	authzv1 "github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1"
	"github.com/cloud-connector/cloud-connector/services/server/servertest"
)

func TestAllowedJSON(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	req := e.newRequest(t, http.MethodPost, "/v2/code/completions?stream=false&path=a%2Fb", "allow", strings.NewReader(sampleBody))
	h := req.Header
	h.Set("X-Request-Id", "req-123")
	h.Set("X-Gitlab-Global-User-Id", "user-7")
	h.Set("X-Gitlab-Client-Type", "vscode")
	h.Set("X-Gitlab-Deployment-Type", "self-managed")
	h.Set("X-Gitlab-Host-Name", "gitlab.example.com")
	h.Set("X-Gitlab-Feature-Enabled-By-Namespace-Ids", "1,2")
	// Internal headers only the gateway may set, in any spelling.
	h.Set("X-Cloud-Connector-Organization-Id", "00000000-0000-0000-0000-000000000000")
	h["x-cloud-connector-plan"] = []string{"ultimate"}
	h.Set("X-Cloud-Connector-Instance-Id", "someone-else")
	h.Set("X-Cloud-Connector-Realm", "saas")
	h.Set("X-Cloud-Connector-Feature", "duo_chat")
	h.Set("X-Cloud-Connector-Gateway", "cicd")
	h.Set("X-Cloud-Connector-Units", "0")
	h.Set("X-Cloud-Connector-Anything", "x")
	// Forwarding headers from an untrusted client.
	h.Set("X-Forwarded-For", "203.0.113.9")
	h.Set("X-Forwarded-Host", "evil.example")
	h.Set("X-Forwarded-Proto", "https")
	h.Set("Forwarded", "for=203.0.113.9")
	h.Set("X-Real-Ip", "203.0.113.9")
	// Hop-by-hop headers.
	h.Set("Connection", "X-Hop-Req")
	h.Set("X-Hop-Req", "1")
	h.Set("Keep-Alive", "timeout=5")
	h.Set("Proxy-Authorization", "Basic Zm9vOmJhcg==")

	r := e.do(t, req)
	if r.status != http.StatusOK {
		t.Fatalf("status = %d; want 200 (body %s)", r.status, r.body)
	}
	s := r.seen(t)

	t.Run("backend request", func(t *testing.T) {
		backendHost := strings.TrimPrefix(e.cfg.Backends["main"].URL, "http://")
		if s.Method != "POST" || s.Path != "/v2/code/completions" || s.RawPath != "" || s.Query != "stream=false&path=a%2Fb" ||
			s.Body != sampleBody || s.Host != backendHost {
			t.Errorf("backend saw %s %s (raw %q) ?%s host %s body %q; want POST /v2/code/completions ?stream=false&path=a%%2Fb host %s and the body",
				s.Method, s.Path, s.RawPath, s.Query, s.Host, s.Body, backendHost)
		}
	})
	t.Run("backend headers", func(t *testing.T) {
		for k, want := range map[string][]string{
			"Authorization":                             {"Bearer allow"},
			"X-Gitlab-Authentication-Type":              {"oidc"},
			"X-Gitlab-Instance-Id":                      {instanceID},
			"X-Gitlab-Realm":                            {realm},
			"X-Gitlab-Version":                          {"17.6.0"},
			"X-Gitlab-Global-User-Id":                   {"user-7"},
			"X-Gitlab-Client-Type":                      {"vscode"},
			"X-Gitlab-Feature-Enabled-By-Namespace-Ids": {"1,2"},
			"Content-Type":                              {"application/json"},
			"X-Cloud-Connector-Organization-Id":         {orgID},
			"X-Cloud-Connector-Instance-Id":             {instanceID},
			"X-Cloud-Connector-Realm":                   {realm},
			"X-Cloud-Connector-Plan":                    {plan},
			"X-Cloud-Connector-Feature":                 {"complete_code"},
			"X-Cloud-Connector-Gateway":                 {"ai"},
			"X-Request-Id":                              {"req-123"},
			"X-Forwarded-For":                           {"127.0.0.1"},
			"X-Forwarded-Host":                          {e.g.Addr()},
			"X-Forwarded-Proto":                         {"http"},
		} {
			if got := s.Header[k]; !slices.Equal(got, want) {
				t.Errorf("backend header %s = %q; want %q", k, got, want)
			}
		}
		for _, k := range []string{
			"X-Cloud-Connector-Units", "X-Cloud-Connector-Anything", "Forwarded", "X-Real-Ip",
			"X-Hop-Req", "Keep-Alive", "Proxy-Authorization",
		} {
			if got, ok := s.Header[k]; ok {
				t.Errorf("backend got header %s = %q; want none", k, got)
			}
		}
		var internal []string
		for k := range s.Header {
			if strings.HasPrefix(strings.ToLower(k), "x-cloud-connector-") {
				internal = append(internal, k)
			}
		}
		if len(internal) != 6 {
			t.Errorf("backend got internal headers %q; want exactly the six the gateway sets", internal)
		}
	})
	t.Run("client response", func(t *testing.T) {
		if got := r.header.Get("X-Backend"); got != "main" {
			t.Errorf("X-Backend = %q; want main", got)
		}
		if got := r.header.Values("X-Request-Id"); !slices.Equal(got, []string{"req-123"}) {
			t.Errorf("X-Request-Id = %q; want [req-123]", got)
		}
		for _, k := range []string{"X-Cloud-Connector-Units", "X-Cloud-Connector-Internal", "X-Back-Hop", "Keep-Alive"} {
			if got, ok := r.header[k]; ok {
				t.Errorf("client got header %s = %q; want none", k, got)
			}
		}
	})
	t.Run("decision request", func(t *testing.T) {
		want := &authzv1.AuthorizeRequest{
			Authorization: "Bearer allow", AuthenticationType: "oidc", Feature: "complete_code", Audience: "gitlab-ai-gateway",
			Request: &authzv1.RequestFacts{
				Method: "POST", Path: "/v2/code/completions", InstanceId: instanceID, Realm: realm, GlobalUserId: "user-7",
				GitlabVersion: "17.6.0", ClientType: "vscode", DeploymentType: "self-managed", HostName: "gitlab.example.com",
				RequestId: "req-123",
			},
		}
		if got := e.fake.last(t); !proto.Equal(got, want) {
			t.Errorf("Authorize request = %v; want %v", got, want)
		}
	})
	t.Run("usage", func(t *testing.T) {
		e.stopped(t)
		rows := e.usage(t)
		if len(rows) != 1 || rows[0].Units == nil || *rows[0].Units != 42 || rows[0].ResponseBytes != int64(len(r.body)) {
			t.Errorf("usage rows %+v; want one with the backend's 42 units", rows)
		}
	})
}

func TestRequestID(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	for _, tc := range []struct {
		name, sent string
		kept       bool
	}{
		{"none", "", false},
		{"sane", "abc-DEF_1.2:3", true},
		{"space", "abc def", false},
		{"non-ascii", "réq", false},
		{"too long", strings.Repeat("a", 129), false},
		{"longest", strings.Repeat("a", 128), true},
	} {
		req := e.newRequest(t, http.MethodPost, "/v2/code/completions", "allow", strings.NewReader("{}"))
		if tc.sent != "" {
			req.Header.Set("X-Request-Id", tc.sent)
		}
		r := e.do(t, req)
		id := r.header.Get("X-Request-Id")
		backend := r.seen(t).Header.Get("X-Request-Id")
		decided := e.fake.last(t).GetRequest().GetRequestId()
		switch {
		case id == "" || id != backend || id != decided:
			t.Errorf("%s: response id %q, backend id %q, decision id %q; want one id everywhere", tc.name, id, backend, decided)
		case tc.kept && id != tc.sent:
			t.Errorf("%s: id %q replaced by %q", tc.name, tc.sent, id)
		case !tc.kept && id == tc.sent:
			t.Errorf("%s: id %q kept; want a new one", tc.name, tc.sent)
		}
	}
}

func TestForwardedHeadersFromTrustedProxy(t *testing.T) {
	t.Parallel()
	e := setup(t, options{configure: func(c *gateway.Config) { c.TrustedProxies = []string{"127.0.0.0/8"} }})
	req := e.newRequest(t, http.MethodPost, "/v2/code/completions", "allow", strings.NewReader("{}"))
	req.Header.Set("X-Forwarded-For", "203.0.113.9")
	req.Header.Set("X-Forwarded-Host", "cloud.gitlab.com")
	req.Header.Set("X-Forwarded-Proto", "https")
	req.Header.Set("X-Cloud-Connector-Organization-Id", "00000000-0000-0000-0000-000000000000")
	s := e.do(t, req).seen(t)
	for k, want := range map[string]string{
		"X-Forwarded-For":                   "203.0.113.9, 127.0.0.1",
		"X-Forwarded-Host":                  "cloud.gitlab.com",
		"X-Forwarded-Proto":                 "https",
		"X-Cloud-Connector-Organization-Id": orgID, // trusted hops never set identity
	} {
		if got := s.Header.Get(k); got != want {
			t.Errorf("backend header %s = %q; want %q", k, got, want)
		}
	}
}

// TestDuplicateIdentityHeaders: the decision covers one value of each
// identity header, so a request carrying one twice is refused rather than
// forwarded with a value nobody authorized.
func TestDuplicateIdentityHeaders(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	for _, tc := range []struct {
		header string
		values []string
	}{
		{"X-Gitlab-Unit-Primitive", []string{"duo_chat", "generate_code"}},
		{"X-Gitlab-Instance-Id", []string{instanceID, "inst-other"}},
		{"Authorization", []string{"Bearer allow", "Bearer other"}},
	} {
		req := e.newRequest(t, http.MethodPost, "/v1/prompts/x", "allow", strings.NewReader("{}"))
		req.Header.Set("X-Gitlab-Unit-Primitive", "duo_chat")
		req.Header[tc.header] = tc.values
		r := e.do(t, req)
		wantJSON(t, r, http.StatusBadRequest, map[string]any{"detail": "Duplicate " + tc.header + " header"})
	}
}

func TestStreaming(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, path, contentType string
		first, rest             string
		proto2                  bool // client speaks HTTP/2 to the gateway
	}{
		{"sse", "/v4/code/suggestions", "text/event-stream",
			"event: stream_start\ndata: {\"id\":1}\n\n", "event: content_chunk\ndata: {\"text\":\"return n % 2 == 0\"}\n\nevent: stream_end\ndata: {}\n\n", false},
		{"raw text event stream", "/v2/code/completions", "text/event-stream", "def is_even", "(n):\n    return n % 2 == 0\n", false},
		{"ndjson", "/v2/chat/agent", "application/x-ndjson", "{\"type\":\"start\"}\n", "{\"type\":\"chunk\",\"text\":\"hi\"}\n{\"type\":\"end\"}\n", false},
		{"ndjson via http2 backend", "/v1/stream-h2", "application/x-ndjson", "{\"type\":\"start\"}\n", "{\"type\":\"end\"}\n", false},
		{"sse to http2 client", "/v4/code/suggestions", "text/event-stream", "data: 1\n\n", "data: 2\n\n", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			release := make(chan struct{})
			var releaseOnce sync.Once
			releaseAll := func() { releaseOnce.Do(func() { close(release) }) }
			t.Cleanup(releaseAll) // runs before the backend is closed
			backend := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.Copy(io.Discard, r.Body)
				w.Header().Set("Content-Type", tc.contentType)
				w.Header().Set("X-Cloud-Connector-Units", "7")
				io.WriteString(w, tc.first)
				if err := http.NewResponseController(w).Flush(); err != nil {
					t.Errorf("backend flush: %v", err)
				}
				select {
				case <-release:
				case <-r.Context().Done():
					return
				}
				io.WriteString(w, tc.rest)
			})
			e := setup(t, options{handler: backend})
			client := e.client
			if tc.proto2 {
				client = h2cClient(t)
			}

			// A gateway that buffers never delivers the first chunk; the
			// deadline turns that hang into a failure.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			req := e.newRequest(t, http.MethodPost, tc.path, "allow", strings.NewReader(`{"stream":true}`)).WithContext(ctx)
			res, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			if res.StatusCode != http.StatusOK || res.Header.Get("Content-Type") != tc.contentType {
				t.Fatalf("status %d, Content-Type %q; want 200 %s", res.StatusCode, res.Header.Get("Content-Type"), tc.contentType)
			}
			if res.ContentLength != -1 {
				t.Errorf("ContentLength = %d; want -1 (streamed)", res.ContentLength)
			}
			if !tc.proto2 && !slices.Equal(res.TransferEncoding, []string{"chunked"}) {
				t.Errorf("TransferEncoding = %q; want chunked", res.TransferEncoding)
			}
			if _, ok := res.Header["X-Cloud-Connector-Units"]; ok {
				t.Error("client got X-Cloud-Connector-Units")
			}
			first := make([]byte, len(tc.first))
			if _, err := io.ReadFull(res.Body, first); err != nil {
				t.Fatalf("read first chunk while the backend holds the rest: %v", err)
			}
			if string(first) != tc.first {
				t.Fatalf("first chunk = %q; want %q", first, tc.first)
			}
			releaseAll()
			rest, err := io.ReadAll(res.Body)
			if err != nil {
				t.Fatal(err)
			}
			if string(rest) != tc.rest {
				t.Errorf("rest = %q; want %q", rest, tc.rest)
			}
			res.Body.Close()

			e.stopped(t)
			rows := e.usage(t)
			if len(rows) != 1 {
				t.Fatalf("usage rows = %d; want 1", len(rows))
			}
			if u := rows[0]; u.Status != 200 || u.ResponseBytes != int64(len(tc.first)+len(tc.rest)) || u.Units == nil || *u.Units != 7 ||
				u.RequestBytes != int64(len(`{"stream":true}`)) {
				t.Errorf("usage row status %d, bytes %d/%d, units %v; want 200, %d/%d, 7",
					u.Status, u.RequestBytes, u.ResponseBytes, u.Units, len(`{"stream":true}`), len(tc.first)+len(tc.rest))
			}
		})
	}
}

// TestStreamCutShortIsRecorded: a client that stops reading a stream
// (a code suggestion superseded by typing) still used the backend, so its
// request is metered.
func TestStreamCutShortIsRecorded(t *testing.T) {
	t.Parallel()
	backendDone := make(chan struct{})
	backend := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer close(backendDone)
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("X-Cloud-Connector-Units", "3")
		io.WriteString(w, "data: 1\n\n")
		http.NewResponseController(w).Flush()
		<-r.Context().Done() // until the gateway gives up on it
	})
	e := setup(t, options{handler: backend})
	res, err := e.client.Do(e.newRequest(t, http.MethodPost, "/v4/code/suggestions", "allow", strings.NewReader("{}")))
	if err != nil {
		t.Fatal(err)
	}
	first := make([]byte, len("data: 1\n\n"))
	if _, err := io.ReadFull(res.Body, first); err != nil {
		t.Fatal(err)
	}
	res.Body.Close() // the client goes away mid-stream
	<-backendDone
	servertest.Eventually(t, "the request metric", func() bool {
		return e.metric(t, "cloudconnector_gateway_requests_total", `route="code_suggestions"`) == 1
	})
	e.stopped(t)
	rows := e.usage(t)
	if len(rows) != 1 {
		t.Fatalf("usage rows = %d; want 1 for the cut stream", len(rows))
	}
	// The client went away: 499, with what was sent and the units reported.
	if u := rows[0]; u.Status != 499 || u.ResponseBytes != int64(len(first)) || u.Units == nil || *u.Units != 3 {
		t.Fatalf("usage row status %d, response bytes %d, units %v; want 499, %d, 3", u.Status, u.ResponseBytes, u.Units, len(first))
	}
}

// webSocketRoutes opts the test table's WebSocket routes in to upgrades.
func webSocketRoutes(c *gateway.Config) {
	for i, r := range c.Routes.Routes {
		if r.Name == "ws" || r.Name == "ws_h2" {
			c.Routes.Routes[i].WebSocket = true
		}
	}
}

func TestWebSocket(t *testing.T) {
	t.Parallel()
	for _, path := range []string{"/v1/ws", "/v1/ws-h2"} {
		t.Run(strings.TrimPrefix(path, "/v1/"), func(t *testing.T) {
			t.Parallel()
			e := setup(t, options{configure: webSocketRoutes})
			conn, br, res := e.upgrade(t, path, "allow")
			defer conn.Close()
			if res.StatusCode != http.StatusSwitchingProtocols {
				body, _ := io.ReadAll(res.Body)
				t.Fatalf("status = %d (%s); want 101", res.StatusCode, body)
			}
			if got := res.Header.Get("Upgrade"); got != "websocket" {
				t.Errorf("Upgrade = %q; want websocket", got)
			}
			if got := res.Header.Get("X-Seen-Feature"); got != "duo_chat" {
				t.Errorf("backend saw X-Cloud-Connector-Feature %q; want duo_chat", got)
			}
			if got := res.Header.Get("X-Seen-Proto"); got != "HTTP/1.1" {
				t.Errorf("backend saw the upgrade over %q; want HTTP/1.1", got)
			}
			if line, err := br.ReadString('\n'); err != nil || line != "welcome\n" {
				t.Fatalf("server to client: %q, %v; want welcome", line, err)
			}
			for _, msg := range []string{"ping\n", strings.Repeat("x", 64<<10) + "\n", "bye\n"} {
				if _, err := io.WriteString(conn, msg); err != nil {
					t.Fatal(err)
				}
				if line, err := br.ReadString('\n'); err != nil || line != "echo:"+msg {
					t.Fatalf("echo of %d bytes: got %d bytes, %v", len(msg), len(line), err)
				}
			}
		})
	}
	t.Run("denied", func(t *testing.T) {
		t.Parallel()
		e := setup(t, options{configure: webSocketRoutes})
		conn, _, res := e.upgrade(t, "/v1/ws", "unauth")
		defer conn.Close()
		if res.StatusCode != http.StatusUnauthorized {
			t.Fatalf("status = %d; want 401", res.StatusCode)
		}
		body, _ := io.ReadAll(res.Body)
		wantJSON(t, result{status: res.StatusCode, header: res.Header, body: body}, 401, map[string]any{"error": "Forbidden by auth provider"})
	})
}

// upgrade sends a WebSocket handshake on a raw connection.
func (e *env) upgrade(tb testing.TB, path, token string) (net.Conn, *bufio.Reader, *http.Response) {
	tb.Helper()
	conn, err := net.Dial("tcp", e.g.Addr())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(30 * time.Second)) // a hang fails, not stalls, the test
	fmt.Fprintf(conn, "GET %s%s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"+
		"Authorization: Bearer %s\r\nX-Gitlab-Authentication-Type: oidc\r\nX-Gitlab-Instance-Id: %s\r\nX-Gitlab-Realm: %s\r\n\r\n",
		e.cfg.Prefix, path, e.g.Addr(), token, instanceID, realm)
	br := bufio.NewReader(conn)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		tb.Fatalf("read handshake response: %v", err)
	}
	return conn, br, res
}

// TestWebSocketUsage: a WebSocket session is metered once it ends, with
// the status the client got.
func TestWebSocketUsage(t *testing.T) {
	t.Parallel()
	e := setup(t, options{configure: webSocketRoutes})
	conn, br, res := e.upgrade(t, "/v1/ws", "allow")
	if res.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status = %d; want 101", res.StatusCode)
	}
	br.ReadString('\n')
	conn.Close()
	db := e.pool(t)
	var status int
	servertest.Eventually(t, "the WebSocket usage event", func() bool {
		err := db.QueryRow(context.Background(), `SELECT status FROM usage_events WHERE route = 'ws'`).Scan(&status)
		return err == nil
	})
	if status != http.StatusSwitchingProtocols {
		t.Fatalf("BUG: gateway/writer.go recorder never sees the 101: httputil.ReverseProxy hijacks and writes the 101 "+
			"itself (handleUpgradeResponse), so statusOf falls back to 200 and usage_events.status is %d for a WebSocket session; want 101", status)
	}
}

// TestWebSocketShutdown: graceful shutdown drains in-flight streams, so Run
// must not return (and flush usage) while a WebSocket session is still
// being proxied.
func TestWebSocketShutdown(t *testing.T) {
	t.Parallel()
	e := setup(t, options{configure: webSocketRoutes})
	conn, br, res := e.upgrade(t, "/v1/ws", "allow")
	if res.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("status = %d; want 101", res.StatusCode)
	}
	br.ReadString('\n')
	e.stop() // the session is idle: it never ends by itself
	io.WriteString(conn, "still there?\n")
	line, err := br.ReadString('\n')
	if err == nil {
		conn.Close()
		t.Fatalf("BUG: gateway.go Run returned while a WebSocket session was still proxied (got %q after Run): "+
			"http.Server.Shutdown does not track hijacked connections, so upgraded sessions are neither drained nor closed, "+
			"outlive Run, and their usage event goes to a closed recorder (dropped)", line)
	}
}

func h2cClient(tb testing.TB) *http.Client {
	tb.Helper()
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: &p}
	tb.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// healthClient calls grpc.health.v1.Health/Check over gRPC. grpchealth
// ships only the handler; the request (service = 1, string) and the
// response (status = 1, enum) have the wire form of StringValue and
// Int32Value.
func healthClient(tb testing.TB, e *env) *connect.Client[wrapperspb.StringValue, wrapperspb.Int32Value] {
	tb.Helper()
	return connect.NewClient[wrapperspb.StringValue, wrapperspb.Int32Value](
		h2cClient(tb), e.base+"/grpc.health.v1.Health/Check", connect.WithGRPC())
}

func healthCheck(ctx context.Context, c *connect.Client[wrapperspb.StringValue, wrapperspb.Int32Value], token, service string) (*connect.Response[wrapperspb.Int32Value], error) {
	req := connect.NewRequest(wrapperspb.String(service))
	if token != "" {
		req.Header().Set("Authorization", "Bearer "+token)
	}
	req.Header().Set("X-Gitlab-Authentication-Type", "oidc")
	req.Header().Set("X-Gitlab-Instance-Id", instanceID)
	req.Header().Set("X-Gitlab-Realm", realm)
	return c.CallUnary(ctx, req)
}

func TestGRPC(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	c := healthClient(t, e)
	ctx := context.Background()

	t.Run("serving", func(t *testing.T) {
		res, err := healthCheck(ctx, c, "allow", "")
		if err != nil {
			t.Fatalf("Check: %v", err)
		}
		const serving = 1
		if res.Msg.GetValue() != serving {
			t.Errorf("status = %d; want SERVING", res.Msg.GetValue())
		}
		if got := e.fake.last(t).GetFeature(); got != "duo_workflow_execute_workflow" {
			t.Errorf("feature = %q", got)
		}
		if got := e.fake.last(t).GetAudience(); got != "gitlab-duo-workflow-service" {
			t.Errorf("audience = %q", got)
		}
	})
	t.Run("backend status in trailers", func(t *testing.T) {
		_, err := healthCheck(ctx, c, "allow", "no.such.Service")
		if code := connect.CodeOf(err); code != connect.CodeNotFound {
			t.Errorf("Check(unknown service) code = %v (%v); want NotFound", code, err)
		}
	})
	for _, tc := range []struct {
		token string
		code  connect.Code
		msg   string
	}{
		{"unauth", connect.CodeUnauthenticated, "Forbidden by auth provider"},
		{"forbidden", connect.CodePermissionDenied, "Unauthorized to access complete_code"},
		{"", connect.CodeUnauthenticated, "No authorization header presented"},
	} {
		t.Run("denied "+tc.token, func(t *testing.T) {
			_, err := healthCheck(ctx, c, tc.token, "")
			var ce *connect.Error
			if !errors.As(err, &ce) || ce.Code() != tc.code || ce.Message() != tc.msg {
				t.Errorf("Check = %v; want %v %q", err, tc.code, tc.msg)
			}
		})
	}
	t.Run("unrouted method", func(t *testing.T) {
		watch := connect.NewClient[wrapperspb.StringValue, wrapperspb.Int32Value](
			h2cClient(t), e.base+"/grpc.health.v1.Health/List", connect.WithGRPC())
		req := connect.NewRequest(wrapperspb.String(""))
		req.Header().Set("Authorization", "Bearer allow")
		_, err := watch.CallUnary(ctx, req)
		if code := connect.CodeOf(err); code != connect.CodeUnimplemented {
			t.Errorf("unrouted gRPC method: code %v (%v); want Unimplemented", code, err)
		}
	})
	t.Run("decision service down", func(t *testing.T) {
		e := setup(t, options{})
		e.fake.srv.Close()
		_, err := healthCheck(ctx, healthClient(t, e), "allow", "")
		if code := connect.CodeOf(err); code != connect.CodeUnavailable {
			t.Errorf("code = %v (%v); want Unavailable", code, err)
		}
	})
}

// TestHTTP2Client: plain requests over HTTP/2 cleartext are proxied too.
func TestHTTP2Client(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	req := e.newRequest(t, http.MethodPost, "/v2/code/completions", "allow", strings.NewReader(sampleBody))
	res, err := h2cClient(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(res.Body)
	r := result{status: res.StatusCode, header: res.Header, body: body}
	if res.ProtoMajor != 2 || r.status != 200 || r.seen(t).Body != sampleBody {
		t.Errorf("HTTP/%d status %d body %s", res.ProtoMajor, r.status, body)
	}
}

// TestInternalTrailersStripped: internal headers never reach the client,
// whether the backend sends them as headers or as trailers (streams report
// totals at the end).
func TestInternalTrailersStripped(t *testing.T) {
	t.Parallel()
	backend := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Trailer", "X-Cloud-Connector-Units, X-Cloud-Connector-Secret, X-Checksum")
		io.WriteString(w, "data: done\n\n")
		w.Header().Set("X-Cloud-Connector-Units", "5")
		w.Header().Set("X-Cloud-Connector-Secret", "backend only")
		w.Header().Set("X-Checksum", "abc")
	})
	e := setup(t, options{handler: backend})
	res, err := e.client.Do(e.newRequest(t, http.MethodPost, "/v2/code/completions", "allow", strings.NewReader("{}")))
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if got := res.Trailer.Get("X-Checksum"); got != "abc" {
		t.Errorf("trailer X-Checksum = %q; want abc passed through", got)
	}
	var leaked []string
	for k := range res.Trailer {
		if strings.HasPrefix(k, "X-Cloud-Connector-") {
			leaked = append(leaked, k+": "+res.Trailer.Get(k))
		}
	}
	e.stopped(t)
	if rows := e.usage(t); len(rows) != 1 || rows[0].Units == nil || *rows[0].Units != 5 {
		t.Errorf("usage rows %+v; want one with the 5 units the backend reported in a trailer", rows)
	}
	if len(leaked) > 0 {
		t.Fatalf("BUG: gateway/proxy.go ModifyResponse strips X-Cloud-Connector-* from response headers only; "+
			"backend trailers %q reach the client (and units reported in a trailer are never metered)", leaked)
	}
}

// TestRequestIDOnce: a backend that echoes X-Request-Id (many do) must not
// make the client see it twice.
func TestRequestIDOnce(t *testing.T) {
	t.Parallel()
	backend := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("X-Request-Id", r.Header.Get("X-Request-Id"))
		io.WriteString(w, "{}")
	})
	e := setup(t, options{handler: backend})
	req := e.newRequest(t, http.MethodPost, "/v2/code/completions", "allow", strings.NewReader("{}"))
	req.Header.Set("X-Request-Id", "req-once")
	r := e.do(t, req)
	if got := r.header.Values("X-Request-Id"); len(got) != 1 {
		t.Fatalf("BUG (minor): gateway/handler.go sets X-Request-Id on the response before proxying and "+
			"httputil.ReverseProxy adds (not sets) the backend's headers, so the client gets X-Request-Id %q", got)
	}
}
