package gateway

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Response bodies GitLab clients handle, word for word.
const (
	msgTooManyRequests = "Too many requests. Please try again later."
	msgUnavailable     = "Service temporarily unavailable"
	msgBadGateway      = "Bad gateway"
	msgGatewayTimeout  = "Gateway timeout"
	msgNotFound        = "Not Found"
	msgMethod          = "Method Not Allowed"
	msgBadPath         = "Invalid request path"
	msgTooLarge        = "Request body too large"
	msgUpgrade         = "Protocol upgrade not supported"
	msgInternal        = "Internal server error"
)

// gRPC status codes used for denials of gRPC requests.
const (
	grpcInvalidArgument   = 3
	grpcPermissionDenied  = 7
	grpcResourceExhausted = 8
	grpcUnimplemented     = 12
	grpcInternal          = 13
	grpcUnavailable       = 14
	grpcUnauthenticated   = 16
)

// problem is an error answer in one of GitLab's shapes.
type problem struct {
	status int
	body   any
	// grpcCode and msg answer gRPC clients, which cannot read JSON errors.
	grpcCode int
	msg      string
}

func detail(status, grpcCode int, msg string) problem {
	return problem{status: status, body: map[string]string{"detail": msg}, grpcCode: grpcCode, msg: msg}
}

// unauthenticated is GitLab's 401 shape: {"error": "..."}.
func unauthenticated(msg string) problem {
	return problem{status: http.StatusUnauthorized, body: map[string]string{"error": msg}, grpcCode: grpcUnauthenticated, msg: msg}
}

// forbidden is GitLab's 403 shape: {"detail": "..."}.
func forbidden(msg string) problem { return detail(http.StatusForbidden, grpcPermissionDenied, msg) }

func tooManyRequests() problem {
	return detail(http.StatusTooManyRequests, grpcResourceExhausted, msgTooManyRequests)
}

// quotaExceeded is GitLab's 402 for spent credits.
func quotaExceeded(feature string, reset time.Time) problem {
	msg := "Usage quota for " + feature + " is exhausted; it renews at " + reset.UTC().Format(time.RFC3339) + "."
	return problem{
		status: http.StatusPaymentRequired,
		body: map[string]string{
			"error":      "insufficient_credits",
			"error_code": "USAGE_QUOTA_EXCEEDED",
			"message":    msg,
		},
		grpcCode: grpcResourceExhausted,
		msg:      msg,
	}
}

func internalError() problem {
	return detail(http.StatusInternalServerError, grpcInternal, msgInternal)
}

func unavailable() problem {
	return detail(http.StatusServiceUnavailable, grpcUnavailable, msgUnavailable)
}

func isGRPC(r *http.Request) bool {
	return r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc")
}

// write sends p. gRPC requests get an HTTP 200 trailers-only response with
// grpc-status, so gRPC clients see a proper status code.
func (p problem) write(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	if isGRPC(r) {
		h.Set("Content-Type", "application/grpc")
		h.Set("Grpc-Status", strconv.Itoa(p.grpcCode))
		h.Set("Grpc-Message", grpcEncode(p.msg))
		w.WriteHeader(http.StatusOK)
		return
	}
	h.Set("Content-Type", "application/json")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(p.status)
	json.NewEncoder(w).Encode(p.body)
}

// grpcEncode percent-encodes a grpc-message value (gRPC over HTTP/2 spec).
func grpcEncode(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c <= 0x7e && c != '%' {
			b.WriteByte(c)
			continue
		}
		b.WriteString("%" + strings.ToUpper(strconv.FormatInt(int64(c)|0x100, 16)[1:]))
	}
	return b.String()
}
