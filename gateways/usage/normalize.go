package usage

import (
	"strings"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
)

// maxTextBytes bounds each text column. Several come from client headers, and
// one oversized value must not bloat a batch or the spool.
const maxTextBytes = 1024

// maxClockSkew is how far occurred_at may be from what the gateway's clock
// makes plausible: ahead of the time the event is recorded, or earlier than
// the start of the request it describes.
const maxClockSkew = time.Hour

// fixes says what normalize corrected.
type fixes uint8

const (
	fixedValue  fixes = 1 << iota // some value was corrected (set with each of the others)
	fixedFuture                   // occurred_at was too far ahead of now
	fixedPast                     // occurred_at was too far before the request could have started
)

// normalize corrects, in place, every value usage_events or the spool would
// refuse, and reports what it changed. Correcting rather than dropping keeps
// the request counted: a bad byte count is a bug to fix, not a reason to lose
// the event, and one refused row would otherwise fail its whole batch on
// every retry. It also copies *Units, so the caller may reuse it. It is cheap
// enough for the request path.
//
// An occurred_at more than maxClockSkew ahead of now is set to now: such an
// event would land in a month with no partition yet (up to year 9999, the
// most the spool's JSON can encode), and analysts would see usage in the
// future. With checkPast, which Record sets, so is one that puts the end of
// the request (OccurredAt + Duration) more than maxClockSkew before now:
// Record runs right after the response, so that can only be a wrong clock or
// a bug. Replay from the spool does not check the past: spooled events are
// legitimately old.
func normalize(e *Event, now time.Time, checkPast bool) (f fixes) {
	if e.ID == uuid.Nil {
		// crypto/rand never fails since Go 1.24, so neither does NewV7.
		e.ID, _ = uuid.NewV7()
		f |= fixedValue
	}
	if e.Duration < 0 {
		e.Duration = 0
		f |= fixedValue
	}
	switch at := e.OccurredAt; {
	case at.IsZero():
		e.OccurredAt = now
		f |= fixedValue
	case at.After(now.Add(maxClockSkew)):
		e.OccurredAt = now
		f |= fixedValue | fixedFuture
	case at.Year() < 1 || checkPast && at.Add(e.Duration).Before(now.Add(-maxClockSkew)):
		e.OccurredAt = now
		f |= fixedValue | fixedPast
	}
	e.OccurredAt = e.OccurredAt.UTC()
	if e.OrganizationID != "" && uuid.Validate(e.OrganizationID) != nil {
		e.OrganizationID = ""
		f |= fixedValue
	}
	for _, s := range [...]*string{
		&e.InstanceID, &e.Realm, &e.GlobalUserID, &e.Feature, &e.Gateway, &e.Route, &e.Method,
		&e.RequestID, &e.GitLabVersion, &e.ClientType,
	} {
		if cleanText(s) {
			f |= fixedValue
		}
	}
	if e.Status < 0 || e.Status > 999 {
		e.Status = 0
		f |= fixedValue
	}
	if e.RequestBytes < 0 {
		e.RequestBytes = 0
		f |= fixedValue
	}
	if e.ResponseBytes < 0 {
		e.ResponseBytes = 0
		f |= fixedValue
	}
	if e.Units != nil {
		u := *e.Units
		if u < 0 {
			u = 0
			f |= fixedValue
		}
		e.Units = &u
	}
	return f
}

// cleanText makes *s valid UTF-8 without NUL bytes (PostgreSQL text refuses
// both) and at most maxTextBytes long, reporting whether it changed *s.
func cleanText(s *string) bool {
	v := *s
	if len(v) <= maxTextBytes && (plainASCII(v) || strings.IndexByte(v, 0) < 0 && utf8.ValidString(v)) {
		return false
	}
	v = strings.ReplaceAll(strings.ToValidUTF8(v, "\uFFFD"), "\x00", "")
	if len(v) > maxTextBytes {
		cut := maxTextBytes
		for cut > 0 && !utf8.RuneStart(v[cut]) {
			cut--
		}
		v = strings.Clone(v[:cut])
	}
	*s = v
	return true
}

// plainASCII reports whether s is ASCII without NUL bytes: the common case,
// checked in one pass that beats two library calls on short header values.
func plainASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c == 0 || c >= utf8.RuneSelf {
			return false
		}
	}
	return true
}
