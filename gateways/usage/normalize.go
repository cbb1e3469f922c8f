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

// normalize corrects, in place, every value usage_events or the spool would
// refuse, and reports whether it changed anything. Correcting rather than
// dropping keeps the request counted: a bad byte count is a bug to fix, not a
// reason to lose the event, and one refused row would otherwise fail its
// whole batch on every retry. It also copies *Units, so the caller may reuse
// it. It is cheap enough for the request path.
func normalize(e *Event) (changed bool) {
	if e.ID == uuid.Nil {
		// crypto/rand never fails since Go 1.24, so neither does NewV7.
		e.ID, _ = uuid.NewV7()
		changed = true
	}
	// The spool's JSON cannot encode years outside 0..9999.
	if y := e.OccurredAt.Year(); e.OccurredAt.IsZero() || y < 1 || y > 9999 {
		e.OccurredAt = time.Now()
		changed = true
	}
	e.OccurredAt = e.OccurredAt.UTC()
	if e.OrganizationID != "" && uuid.Validate(e.OrganizationID) != nil {
		e.OrganizationID = ""
		changed = true
	}
	for _, s := range [...]*string{
		&e.InstanceID, &e.Realm, &e.GlobalUserID, &e.Feature, &e.Gateway, &e.Route, &e.Method,
		&e.RequestID, &e.GitLabVersion, &e.ClientType,
	} {
		if cleanText(s) {
			changed = true
		}
	}
	if e.Status < 0 || e.Status > 999 {
		e.Status = 0
		changed = true
	}
	if e.Duration < 0 {
		e.Duration = 0
		changed = true
	}
	if e.RequestBytes < 0 {
		e.RequestBytes = 0
		changed = true
	}
	if e.ResponseBytes < 0 {
		e.ResponseBytes = 0
		changed = true
	}
	if e.Units != nil {
		u := *e.Units
		if u < 0 {
			u = 0
			changed = true
		}
		e.Units = &u
	}
	return changed
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
