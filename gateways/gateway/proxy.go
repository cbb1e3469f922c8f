package gateway

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel/attribute"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/cloud-connector/cloud-connector/gateways/route"
	"github.com/cloud-connector/cloud-connector/services/telemetry"
)

// Internal headers the gateway sets for backends. Clients can never set
// them: every request header with this prefix is removed first.
const (
	internalPrefix       = "X-Cloud-Connector-"
	hdrOrganizationID    = internalPrefix + "Organization-Id"
	hdrInstanceID        = internalPrefix + "Instance-Id"
	hdrRealm             = internalPrefix + "Realm"
	hdrFeature           = internalPrefix + "Feature"
	hdrPlan              = internalPrefix + "Plan"
	hdrGateway           = internalPrefix + "Gateway"
	hdrRequestID         = "X-Request-Id"
	hdrUnits             = internalPrefix + "Units"
	statusClientGoneAway = 499
)

// backend proxies to one backend service.
type backend struct {
	name   string
	cfg    route.Backend
	target *url.URL
	proxy  *httputil.ReverseProxy
	closer interface{ CloseIdleConnections() }
}

// upstream is what the handler hands the proxy through the request context.
type upstream struct {
	path    string // backend-relative escaped path
	headers http.Header
	// authorized names the canonical request headers the decision depended
	// on. They reach the backend as the client sent them even if it listed
	// them in Connection, which makes the proxy drop them as hop-by-hop.
	authorized []string
	units      *int64
	failure    int // status the proxy answered with itself, if any
}

// clientOverrideHeaders name the client's address, or a URL, host or
// method to use instead of the request's own, in headers that proxies,
// CDNs and frameworks set and some backends believe. Only the gateway says
// who the client is and what it asked for, so a client's are removed, as
// is every X-Forwarded-* header (see spoofable).
var clientOverrideHeaders = map[string]bool{
	"Forwarded":                true,
	"X-Real-Ip":                true,
	"X-Original-Url":           true,
	"X-Original-Uri":           true,
	"X-Original-Host":          true,
	"X-Rewrite-Url":            true,
	"X-Original-Forwarded-For": true,
	"True-Client-Ip":           true,
	"X-Client-Ip":              true,
	"Cf-Connecting-Ip":         true,
	"X-Cluster-Client-Ip":      true,
	"Client-Ip":                true,
	"Fastly-Client-Ip":         true,
	"X-Originating-Ip":         true,
	"X-Remote-Ip":              true,
	"X-Remote-Addr":            true,
	"X-Http-Method-Override":   true,
	"X-Http-Method":            true,
	"X-Method-Override":        true,
}

// spoofable reports a request header that only the gateway may send.
func spoofable(name string) bool {
	name = http.CanonicalHeaderKey(name)
	return strings.HasPrefix(name, "X-Forwarded-") || clientOverrideHeaders[name]
}

type upstreamKey struct{}

func newBackend(name string, cfg route.Backend, trusted []netip.Prefix, tp trace.TracerProvider, logger *slog.Logger) (*backend, error) {
	target, err := url.Parse(cfg.URL)
	if err != nil {
		return nil, err
	}
	h1 := &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          1024,
		MaxIdleConnsPerHost:   256,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		ResponseHeaderTimeout: cfg.HeaderTimeout(),
	}
	b := &backend{name: name, cfg: cfg, target: target, closer: h1}
	var transport http.RoundTripper = h1
	if cfg.HTTP2 {
		h2 := h1.Clone()
		var p http.Protocols
		p.SetUnencryptedHTTP2(true)
		h2.Protocols = &p
		transport = splitTransport{h1: h1, h2: h2}
		b.closer = closers{h1, h2}
	}
	// In a recorded trace, a client span per backend request, whose
	// context the backend gets as traceparent. It ends when the response
	// body is closed, so it spans a whole stream; bodies pass through
	// unbuffered, and a switched protocol's body stays writable. Metrics
	// are Prometheus's, not its.
	//
	// A trace that is not recorded (sampled out, or spans not exported)
	// skips it: the span would be thrown away, and otelhttp's work around
	// it (a deep copy of the request, metric attributes computed for a
	// meter that records nothing) was a fifth of the gateway's own CPU per
	// request. Rewrite then propagates the request's span instead.
	propagator := telemetry.Propagator()
	transport = otelhttp.NewTransport(transport,
		otelhttp.WithTracerProvider(tp),
		otelhttp.WithPropagators(propagator),
		otelhttp.WithMeterProvider(metricnoop.NewMeterProvider()),
		otelhttp.WithFilter(recorded),
		otelhttp.WithSpanNameFormatter(func(_ string, r *http.Request) string { return spanName(r.Method) }),
		otelhttp.WithSpanOptions(trace.WithAttributes(attribute.String("cloudconnector.backend", name))),
	)
	b.proxy = &httputil.ReverseProxy{
		Transport:  transport,
		BufferPool: copyBuffers,
		// ReverseProxy has removed the hop-by-hop headers, including those
		// the client named in Connection, before it calls Rewrite, so the
		// headers set here reach the backend whatever Connection said.
		Rewrite: func(pr *httputil.ProxyRequest) {
			up := pr.In.Context().Value(upstreamKey{}).(*upstream)
			pr.Out.URL.Path, pr.Out.URL.RawPath = unescape(up.path), up.path
			pr.SetURL(target)
			// ReverseProxy drops only Forwarded and X-Forwarded-For, -Host
			// and -Proto; the gateway sets those three itself below.
			for k := range pr.Out.Header {
				if spoofable(k) {
					delete(pr.Out.Header, k)
				}
			}
			trustedPeer := peerTrusted(pr.In.RemoteAddr, trusted)
			if trustedPeer {
				pr.Out.Header["X-Forwarded-For"] = pr.In.Header["X-Forwarded-For"]
			}
			pr.SetXForwarded()
			if trustedPeer {
				if proto := pr.In.Header.Get("X-Forwarded-Proto"); proto == "https" || proto == "http" {
					pr.Out.Header.Set("X-Forwarded-Proto", proto)
				}
				if host := pr.In.Header.Get("X-Forwarded-Host"); host != "" {
					pr.Out.Header.Set("X-Forwarded-Host", host)
				}
			}
			pr.Out.Header.Del("X-Real-Ip")
			// The client's trace context stays at the gateway (see
			// startSpan); the gateway's replaces it.
			for _, k := range traceHeaders {
				delete(pr.Out.Header, k)
			}
			if !recorded(pr.Out) {
				propagator.Inject(pr.Out.Context(), propagation.HeaderCarrier(pr.Out.Header))
			}
			for k := range pr.Out.Header {
				// Underscore names are dropped, as nginx does: backends that
				// fold "_" into "-" (WSGI, CGI) would read them as the
				// identity headers the gateway authorized.
				if strings.HasPrefix(k, internalPrefix) || strings.Contains(k, "_") {
					delete(pr.Out.Header, k)
				}
			}
			for _, k := range up.authorized {
				if v, ok := pr.In.Header[k]; ok {
					pr.Out.Header[k] = slices.Clone(v)
				}
			}
			for k, v := range up.headers {
				pr.Out.Header[k] = v
			}
		},
		ModifyResponse: func(res *http.Response) error {
			up := res.Request.Context().Value(upstreamKey{}).(*upstream)
			up.takeInternal(res.Header)
			// The gateway already answered with its request id.
			res.Header.Del(hdrRequestID)
			if res.StatusCode == http.StatusSwitchingProtocols {
				// The proxy needs the body as it is: the switched connection.
				return nil
			}
			// Announced trailers are filtered now so that the proxy does not
			// announce internal ones to the client. Their values, and any
			// trailer the backend never announced (gRPC over HTTP/2 always
			// does so; HTTP/1.1 handlers with http.TrailerPrefix), arrive at
			// the end of the body, so every body is filtered.
			up.takeInternal(res.Trailer)
			res.Body = &trailerFilter{ReadCloser: res.Body, res: res, up: up}
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			up := r.Context().Value(upstreamKey{}).(*upstream)
			var tooLarge *http.MaxBytesError
			var p problem
			switch {
			case errors.As(err, &tooLarge):
				p = detail(http.StatusRequestEntityTooLarge, grpcResourceExhausted, msgTooLarge)
			case errors.Is(r.Context().Err(), context.Canceled):
				// The client went away; there is no one to answer.
				up.failure = statusClientGoneAway
				return
			case errors.Is(err, context.DeadlineExceeded) || isTimeout(err):
				p = detail(http.StatusGatewayTimeout, grpcUnavailable, msgGatewayTimeout)
			default:
				p = detail(http.StatusBadGateway, grpcUnavailable, msgBadGateway)
			}
			up.failure = p.status
			logger.WarnContext(r.Context(), "proxy to backend failed", "backend", name, "error", err, "status", p.status,
				"request_id", up.headers.Get(hdrRequestID))
			p.write(w, r)
		},
		ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
	return b, nil
}

// recorded reports whether r belongs to a trace this process records.
func recorded(r *http.Request) bool {
	return trace.SpanFromContext(r.Context()).IsRecording()
}

// splitTransport sends upgrade requests (WebSocket) over HTTP/1.1, which
// HTTP/2 cannot carry, and everything else over HTTP/2 cleartext.
type splitTransport struct{ h1, h2 http.RoundTripper }

func (t splitTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Header.Get("Upgrade") != "" {
		return t.h1.RoundTrip(r)
	}
	return t.h2.RoundTrip(r)
}

type closers []*http.Transport

func (cs closers) CloseIdleConnections() {
	for _, c := range cs {
		c.CloseIdleConnections()
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func unescape(p string) string {
	if u, err := url.PathUnescape(p); err == nil {
		return u
	}
	return p
}

func peerTrusted(remoteAddr string, trusted []netip.Prefix) bool {
	if len(trusted) == 0 {
		return false
	}
	ap, err := netip.ParseAddrPort(remoteAddr)
	if err != nil {
		return false
	}
	for _, p := range trusted {
		if p.Contains(ap.Addr().Unmap()) {
			return true
		}
	}
	return false
}

// takeInternal reads the units a backend reported and removes every
// internal header from h, so none reaches the client.
func (up *upstream) takeInternal(h http.Header) {
	if v := h.Get(hdrUnits); v != "" {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil && n >= 0 {
			up.units = &n
		}
	}
	for k := range h {
		if strings.HasPrefix(k, internalPrefix) {
			delete(h, k)
		}
	}
}

// trailerFilter handles trailers once the body has been read (their
// values arrive at its end), before the proxy copies them to the client.
// It reads them from the response each time rather than keeping the map:
// when the backend announced none, the transport assigns a new one.
type trailerFilter struct {
	io.ReadCloser
	res *http.Response
	up  *upstream
}

func (f *trailerFilter) Read(p []byte) (int, error) {
	n, err := f.ReadCloser.Read(p)
	if err == io.EOF {
		f.up.takeInternal(f.res.Trailer)
	}
	return n, err
}

// Close filters the trailers again: ReverseProxy closes the body before it
// copies them, relying on Close to populate them, so a transport may fill
// them in there too.
func (f *trailerFilter) Close() error {
	err := f.ReadCloser.Close()
	f.up.takeInternal(f.res.Trailer)
	return err
}

// copyBuffers recycles the proxy's body copy buffers; without a pool every
// response allocates a fresh 32 KiB buffer.
var copyBuffers = &bufferPool{pool: sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}}

type bufferPool struct{ pool sync.Pool }

func (p *bufferPool) Get() []byte  { return *p.pool.Get().(*[]byte) }
func (p *bufferPool) Put(b []byte) { p.pool.Put(&b) }
