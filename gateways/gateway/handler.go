package gateway

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/google/uuid"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/cloud-connector/cloud-connector/gateways/budget"
	"github.com/cloud-connector/cloud-connector/gateways/internaltoken"
	"github.com/cloud-connector/cloud-connector/gateways/route"
	"github.com/cloud-connector/cloud-connector/gateways/usage"
	authzv1 "github.com/cloud-connector/cloud-connector/proto/gen/cloudconnector/authz/v1"
)

// GitLab request headers the gateway reads.
const (
	hdrAuthType      = "X-Gitlab-Authentication-Type"
	hdrGitLabInst    = "X-Gitlab-Instance-Id"
	hdrGitLabRealm   = "X-Gitlab-Realm"
	hdrGitLabUser    = "X-Gitlab-Global-User-Id"
	hdrGitLabVersion = "X-Gitlab-Version"
	hdrClientType    = "X-Gitlab-Client-Type"
	hdrDeployment    = "X-Gitlab-Deployment-Type"
	hdrHostName      = "X-Gitlab-Host-Name"
)

// serveRoute handles one request on route rt: authorize, spend budget,
// proxy, record usage.
func (g *Gateway) serveRoute(rt route.Route, b *backend, decisionHdrs []string, w http.ResponseWriter, r *http.Request, path string) {
	start := time.Now()
	reqID := requestID(r)
	w.Header().Set(hdrRequestID, reqID)
	span := trace.SpanFromContext(r.Context())
	nameSpan(span, r, rt, reqID)
	up := &upstream{path: path, headers: http.Header{hdrRequestID: {reqID}, hdrGateway: {g.cfg.Name}}}
	ctx := context.WithValue(r.Context(), upstreamKey{}, up)

	if asksUpgrade(r) && !webSocket(rt, r) {
		// A switched connection is a tunnel the gateway no longer sees
		// into: an h2c backend would serve any path, with any headers, on
		// it. Closing the connection keeps whatever the client sent after
		// the handshake from being read as a request.
		w.Header().Set("Connection", "close")
		g.deny(w, r, rt, "upgrade_refused", detail(http.StatusBadRequest, grpcInvalidArgument, msgUpgrade), start)
		return
	}
	if rt.Public {
		rec := &recorder{ResponseWriter: w}
		defer g.finish(rt, rec, up, r, start, nil, nil)
		g.forward(ctx, rt, b, rec, r, up)
		return
	}
	if h := duplicated(r, decisionHdrs); h != "" {
		g.deny(w, r, rt, "duplicate_header", detail(http.StatusBadRequest, grpcInvalidArgument, "Duplicate "+h+" header"), start)
		return
	}

	feature, ok := rt.FeatureOf(r)
	if !ok {
		if feature == "" {
			g.deny(w, r, rt, "missing_feature", detail(http.StatusBadRequest, grpcInvalidArgument, "Missing "+rt.FeatureHeader+" header"), start)
		} else {
			g.deny(w, r, rt, "feature_not_routed", forbidden("Unauthorized to access "+feature), start)
		}
		return
	}
	d, err := g.decisions.Decide(ctx, &authzv1.AuthorizeRequest{
		Authorization:      r.Header.Get("Authorization"),
		AuthenticationType: r.Header.Get(hdrAuthType),
		Feature:            feature,
		Audience:           b.cfg.Audience,
		Request: &authzv1.RequestFacts{
			Method:         r.Method,
			Path:           path,
			InstanceId:     r.Header.Get(hdrGitLabInst),
			Realm:          r.Header.Get(hdrGitLabRealm),
			GlobalUserId:   r.Header.Get(hdrGitLabUser),
			GitlabVersion:  r.Header.Get(hdrGitLabVersion),
			ClientType:     r.Header.Get(hdrClientType),
			DeploymentType: r.Header.Get(hdrDeployment),
			HostName:       r.Header.Get(hdrHostName),
			RequestId:      reqID,
		},
	})
	if span.IsRecording() {
		span.SetAttributes(attribute.String("cloudconnector.feature", feature),
			attribute.Bool("cloudconnector.decision.cached", d.Cached))
	}
	if err != nil {
		g.logger.WarnContext(ctx, "no decision; failing closed", "error", err, "route", rt.Name, "request_id", reqID)
		w.Header().Set("Retry-After", "5")
		g.deny(w, r, rt, "decision_unavailable", unavailable(), start)
		return
	}
	switch d.GetOutcome() {
	case authzv1.Outcome_OUTCOME_UNAUTHENTICATED:
		g.deny(w, r, rt, d.GetReason(), unauthenticated(d.GetMessage()), start)
		return
	case authzv1.Outcome_OUTCOME_FORBIDDEN:
		g.deny(w, r, rt, d.GetReason(), forbidden(d.GetMessage()), start)
		return
	}

	s, bud := d.GetSubject(), d.GetBudget()
	// Signed before the budget is charged, so a failure costs the caller
	// nothing; reused across requests, so it seldom signs at all.
	var internalToken string
	if g.signer != nil {
		if internalToken, err = g.signer.Token(internaltoken.Claims{
			Audience: b.cfg.Audience, Subject: s.GetInstanceId(), OrganizationID: s.GetOrganizationId(),
			Realm: s.GetRealm(), Feature: feature, Plan: s.GetPlan(),
		}); err != nil {
			g.logger.ErrorContext(ctx, "sign internal token", "error", err, "route", rt.Name, "request_id", reqID)
			g.deny(w, r, rt, "internal_token_failed", internalError(), start)
			return
		}
	}
	subject := s.GetOrganizationId()
	if subject == "" {
		subject = "instance:" + s.GetInstanceId()
	}
	out, err := g.budget.Take(ctx, subject, budget.Spec{
		Bucket: bud.GetBucket(), Limit: bud.GetLimit(), Window: bud.GetWindow().AsDuration(), Unit: bud.GetUnit(),
	})
	switch {
	case err != nil && r.Context().Err() != nil:
		// The client went away while the budget was asked; nothing to answer.
		g.observe(ctx, rt.Name, statusClientGoneAway, start)
		return
	case err != nil && rt.FailMode() == route.FailOpen && !errors.Is(err, budget.ErrInvalidSpec):
		g.logger.WarnContext(ctx, "budget unavailable; failing open", "error", err, "route", rt.Name, "request_id", reqID)
	case err != nil:
		g.logger.WarnContext(ctx, "budget unavailable; failing closed", "error", err, "route", rt.Name, "request_id", reqID)
		w.Header().Set("Retry-After", "5")
		g.deny(w, r, rt, "budget_unavailable", unavailable(), start)
		return
	case !out.Allowed:
		h := w.Header()
		retry := out.RetryAfter(time.Now())
		h.Set("Retry-After", strconv.Itoa(int(retry/time.Second)))
		h.Set("RateLimit-Limit", strconv.FormatInt(out.Limit, 10))
		h.Set("RateLimit-Remaining", "0")
		h.Set("RateLimit-Reset", strconv.Itoa(int(retry/time.Second)))
		if bud.GetKind() == authzv1.BudgetKind_BUDGET_KIND_QUOTA {
			g.deny(w, r, rt, "quota_exceeded", quotaExceeded(feature, out.Reset), start)
		} else {
			g.deny(w, r, rt, "rate_limited", tooManyRequests(), start)
		}
		return
	}

	up.headers.Set(hdrOrganizationID, s.GetOrganizationId())
	up.headers.Set(hdrInstanceID, s.GetInstanceId())
	up.headers.Set(hdrRealm, s.GetRealm())
	up.headers.Set(hdrPlan, s.GetPlan())
	up.headers.Set(hdrFeature, feature)
	if internalToken != "" {
		up.headers.Set(internaltoken.Header, internalToken)
	}
	up.authorized = decisionHdrs

	rec := &recorder{ResponseWriter: w}
	body := &counter{ReadCloser: r.Body}
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = body
	}
	userID := s.GetGlobalUserId()
	if userID == "" {
		userID = r.Header.Get(hdrGitLabUser)
	}
	defer g.finish(rt, rec, up, r, start, body, &usage.Event{
		ID:             eventID(),
		OccurredAt:     start.UTC(),
		OrganizationID: s.GetOrganizationId(),
		InstanceID:     s.GetInstanceId(),
		Realm:          s.GetRealm(),
		GlobalUserID:   userID,
		Feature:        feature,
		Gateway:        g.cfg.Name,
		Route:          rt.Name,
		Method:         r.Method,
		RequestID:      reqID,
		GitLabVersion:  r.Header.Get(hdrGitLabVersion),
		ClientType:     r.Header.Get(hdrClientType),
	})
	g.forward(ctx, rt, b, rec, r, up)
}

// finish measures a proxied request and records its usage event. It runs
// deferred, so it also runs when the proxy aborts a response cut short
// mid-stream (http.ErrAbortHandler): such a request used the backend and
// is metered; the abort then continues, closing the client connection.
func (g *Gateway) finish(rt route.Route, rec *recorder, up *upstream, r *http.Request, start time.Time, body *counter, ev *usage.Event) {
	aborted := recover()
	status := statusOf(rec, up)
	if aborted != nil {
		switch {
		case r.Context().Err() != nil:
			status = statusClientGoneAway
		case up.failure != 0:
			status = up.failure
		default:
			status = http.StatusBadGateway
		}
	}
	g.observe(r.Context(), rt.Name, status, start)
	if ev != nil {
		ev.Status = status
		ev.Duration = time.Since(start)
		ev.RequestBytes = body.n + rec.received()
		ev.ResponseBytes = rec.sent()
		ev.Units = up.units
		g.usage.Record(*ev)
	}
	if aborted != nil {
		panic(aborted)
	}
}

// identityHeaders are the request headers a decision depends on. A request
// carrying one twice is refused: the gateway would authorize one value and
// the backend might read another. For the same reason they reach the
// backend even when the client names them in Connection (see upstream).
var identityHeaders = []string{
	"Authorization", hdrAuthType, hdrGitLabInst, hdrGitLabRealm, hdrGitLabUser, hdrGitLabVersion,
	hdrClientType, hdrDeployment, hdrHostName,
}

// decisionHeaders returns the canonical request headers a decision on rt
// depends on: the identity headers and the route's feature header.
func decisionHeaders(rt route.Route) []string {
	if rt.FeatureHeader == "" {
		return identityHeaders
	}
	return append(slices.Clip(identityHeaders), http.CanonicalHeaderKey(rt.FeatureHeader))
}

// duplicated returns the first of hdrs that r carries more than once.
func duplicated(r *http.Request, hdrs []string) string {
	for _, h := range hdrs {
		if len(r.Header.Values(h)) > 1 {
			return h
		}
	}
	return ""
}

// forward proxies r to b within the route's limits. Upgraded connections
// (WebSocket, the only upgrade serveRoute lets through) are tracked so
// shutdown can drain, then cut, them.
func (g *Gateway) forward(ctx context.Context, rt route.Route, b *backend, w http.ResponseWriter, r *http.Request, up *upstream) {
	if limit := rt.BodyLimit(); limit > 0 && r.Body != nil {
		r.Body = http.MaxBytesReader(w, r.Body, limit)
	}
	if rt.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, rt.Timeout.D())
		defer cancel()
		defer func() {
			if errors.Is(ctx.Err(), context.DeadlineExceeded) && up.failure == 0 {
				up.failure = http.StatusGatewayTimeout
			}
		}()
	}
	if isUpgrade(r) {
		done, ok := g.sessions.begin()
		if !ok {
			p := unavailable()
			up.failure = p.status
			p.write(w, r)
			return
		}
		defer done()
		var cancel context.CancelFunc
		ctx, cancel = context.WithCancel(ctx)
		defer cancel()
		defer context.AfterFunc(g.sessions.cut, cancel)()
	}
	b.proxy.ServeHTTP(w, r.WithContext(ctx))
}

// isUpgrade reports a protocol-switch request as httputil.ReverseProxy
// sees one: Upgrade set and "upgrade" among the Connection header's tokens.
func isUpgrade(r *http.Request) bool {
	return r.Header.Get("Upgrade") != "" && hasToken(r.Header.Values("Connection"), "upgrade")
}

// asksUpgrade reports a request that names any protocol in an Upgrade
// field, whatever its Connection header says: the gateway and the proxies
// around it need not agree on how to read that header, so only what
// webSocket accepts goes through. A bare "Connection: upgrade" asks for
// nothing (nginx configurations set it on every request).
func asksUpgrade(r *http.Request) bool {
	return slices.ContainsFunc(r.Header.Values("Upgrade"), func(v string) bool { return strings.TrimSpace(v) != "" })
}

// webSocket reports a WebSocket handshake (RFC 6455 4.1) that rt accepts:
// the route is authorized and opted in, and the request is an HTTP/1.1 GET
// with one Upgrade field naming "websocket" alone and "upgrade" among the
// Connection tokens.
func webSocket(rt route.Route, r *http.Request) bool {
	up := r.Header.Values("Upgrade")
	return rt.WebSocket && !rt.Public && r.Method == http.MethodGet && r.ProtoMajor == 1 &&
		len(up) == 1 && strings.EqualFold(strings.TrimSpace(up[0]), "websocket") &&
		hasToken(r.Header.Values("Connection"), "upgrade")
}

// hasToken reports whether token is among the comma-separated values,
// case-insensitively.
func hasToken(values []string, token string) bool {
	for _, v := range values {
		for tok := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(tok), token) {
				return true
			}
		}
	}
	return false
}

func (g *Gateway) deny(w http.ResponseWriter, r *http.Request, rt route.Route, reason string, p problem, start time.Time) {
	g.metrics.denials.WithLabelValues(g.cfg.Name, rt.Name, strconv.Itoa(p.status), reason).Inc()
	trace.SpanFromContext(r.Context()).SetAttributes(attribute.String("cloudconnector.denial_reason", reason))
	p.write(w, r)
	g.observe(r.Context(), rt.Name, p.status, start)
}

func statusOf(rec *recorder, up *upstream) int {
	switch {
	case up.failure != 0:
		return up.failure
	case rec.status != 0:
		return rec.status
	}
	return http.StatusOK
}

// requestID keeps a client's X-Request-ID when it is a sane token, or
// makes a new one.
func requestID(r *http.Request) string {
	id := r.Header.Get(hdrRequestID)
	if id == "" || len(id) > 128 {
		return uuid.NewString()
	}
	for _, c := range id {
		if c > unicode.MaxASCII || !(unicode.IsLetter(c) || unicode.IsDigit(c) || c == '-' || c == '_' || c == '.' || c == ':') {
			return uuid.NewString()
		}
	}
	return id
}

func eventID() uuid.UUID {
	id, err := uuid.NewV7()
	if err != nil {
		return uuid.New()
	}
	return id
}
