package token

import (
	"errors"
	"fmt"
)

// Reason is a stable, machine-readable cause of a verification failure.
type Reason string

// Reasons a token is refused. They appear in decisions and logs.
const (
	ReasonMalformed       Reason = "token_malformed"
	ReasonUnknownIssuer   Reason = "unknown_issuer"
	ReasonMissingKeyID    Reason = "missing_kid"
	ReasonAlgorithm       Reason = "algorithm_not_allowed"
	ReasonUnknownKey      Reason = "unknown_key"
	ReasonSignature       Reason = "bad_signature"
	ReasonExpired         Reason = "token_expired"
	ReasonNotYetValid     Reason = "token_not_yet_valid"
	ReasonAudience        Reason = "wrong_audience"
	ReasonMissingClaim    Reason = "missing_claim"
	ReasonKeysUnavailable Reason = "keys_unavailable"
)

// Error is a verification failure. Every error Verify returns is an *Error.
type Error struct {
	Reason Reason
	Err    error
}

func (e *Error) Error() string {
	if e.Err == nil {
		return string(e.Reason)
	}
	return fmt.Sprintf("%s: %v", e.Reason, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// Temporary reports whether the failure is on our side (keys could not be
// fetched) rather than the token's: callers should fail closed with a
// retryable error instead of calling the token bad.
func (e *Error) Temporary() bool { return e.Reason == ReasonKeysUnavailable }

func fail(r Reason, format string, args ...any) *Error {
	return &Error{Reason: r, Err: fmt.Errorf(format, args...)}
}

// ReasonOf returns the Reason of a verification error, or "" if err is not one.
func ReasonOf(err error) Reason {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return ""
}
