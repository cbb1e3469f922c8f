package route_test

import (
	"errors"
	"net/url"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/cloud-connector/cloud-connector/gateways/route"
)

// cleanPathCases are the CleanPath table and the seeds of FuzzCleanPath.
var cleanPathCases = []struct {
	in string
	ok bool
}{
	// Canonical paths pass unchanged.
	{"/", true},
	{"/v2/code/completions", true},
	{"/v2/code/completions/", true},
	{"/v1/prompts/chat%20agent", true},
	{"/v1/proxy/anthropic/v1/messages", true},
	{"/a.b/c..d/.e/f.", true},   // dots inside a segment are fine
	{"/v1/%41%42", true},        // an encoded letter is not a trick
	{"/v1/x:y@z;a=b,c$d", true}, // sub-delims
	{"/" + strings.Repeat("a", 2047), true},
	{"/v1/prompts/caf%C3%A9", true},    // UTF-8, encoded
	{"/v1/prompts/%E2%82%AC", true},    // three bytes
	{"/v1/prompts/%F0%9F%A6%8A", true}, // four bytes
	{"/v1/a%3Bb/x;y", true},            // ";" away from a dot segment
	{"/v1/x;../..x;/.x;", true},        // dots that are not a whole "." or ".." before ";"

	// Not absolute, too long.
	{"", false},
	{"v2/code/completions", false},
	{"*", false},
	{"/" + strings.Repeat("a", 2048), false},

	// Empty, "." and ".." segments.
	{"//", false},
	{"/v1/..;/admin", false},    // Tomcat-style path parameter on ".."
	{"/v1/.;x/admin", false},    // and on "."
	{"/v1/%252e%252e/x", false}, // double encoding
	{"/v1/..;", false},
	{"/v1/.;", false},
	{"/v1/..;x", false},
	{"/v1/prompts/..;/..;/v2/chat/agent", false},
	{"/v1/prompts/..%3B/..%3B/v2/chat/agent", false}, // ";" encoded
	{"/v1/prompts/..%3b/x", false},
	{"/v1/..%3B", false},
	{"/v1/.%3B/x", false},
	{"/v1/.%3bjsessionid=1/x", false},
	{"/v1/;/x", false},               // an empty segment once its parameters are cut
	{"/v1/%3Bjsessionid=1/x", false}, // and encoded
	{"/v1/x%0d%0aSet-Cookie", false},
	{"/v1/%zz", false}, // not an escape
	{"/a//b/", false},
	{"//v2/code/completions", false},
	{"/v2//code/completions", false},
	{"/v2/code/completions//", false},
	{"/.", false},
	{"/..", false},
	{"/./v2", false},
	{"/v2/./code", false},
	{"/v2/../x", false},
	{"/v2/code/..", false},
	{"/v2/code/../", false},
	{"/v2/code/./", false},

	// Encoded slash, backslash, dot and NUL, either case.
	{"/v2/code%2fcompletions", false},
	{"/v2/code%2Fcompletions", false},
	{"/v2%5ccode", false},
	{"/v2%5Ccode", false},
	{"/v2/%2e%2e/x", false},
	{"/v2/%2E%2E/x", false},
	{"/v2/%2e/x", false},
	{"/v2/.%2e/x", false},
	{"/v2/a%2eb", false}, // an encoded dot is refused even inside a segment
	{"/v2/%00", false},

	// Overlong UTF-8 (".", "/" in two, three, four bytes) and other
	// invalid UTF-8, which lax decoders turn into dots and slashes.
	{"/v1/prompts/%C0%AE%C0%AE/v2/chat/agent", false},
	{"/v1/prompts/%c0%ae%c0%ae/x", false},
	{"/v1/%c0%ae/x", false},
	{"/v1/%E0%80%AE%E0%80%AE/x", false},
	{"/v1/%F0%80%80%AE/x", false},
	{"/v1/%C0%AF/x", false},
	{"/v1/%C1%9C/x", false},       // overlong backslash
	{"/v1/%ED%A0%80/x", false},    // surrogate
	{"/v1/%F4%90%80%80/x", false}, // past U+10FFFF
	{"/v1/%FF/x", false},
	{"/v1/%C3/x", false}, // truncated sequence
	{"/v1/%C3%28/x", false},
	{"/v1/\xc0\xae/x", false},  // raw, not encoded
	{"/v1/caf\xe9/x", false},   // Latin-1
	{"/v1/caf\u00e9/x", false}, // raw UTF-8: a canonical escaped path is ASCII
	{"/%C2\x8c", false},        // half escaped, half raw
	{"/v1/%C2%85/x", false},    // NEL, a C1 control
	{"/v1/%C2%9F/x", false},
	{"/v1/%C2%A0/x", true}, // no-break space is not a control

	// Raw backslash and control characters.
	{"/v2\\code", false},
	{"/v2/..\\x", false},
	{"/v2/\x00", false},
	{"/v2/\tx", false},
	{"/v2/\r\nx", false},
	{"/v2/\x7f", false},

	// Truncated escapes.
	{"/v2/%", false},
	{"/v2/%2", false},
}

func TestCleanPath(t *testing.T) {
	t.Parallel()
	for _, tc := range cleanPathCases {
		got, err := route.CleanPath(tc.in)
		switch {
		case tc.ok && err != nil:
			t.Errorf("CleanPath(%q): unexpected error %v", tc.in, err)
		case tc.ok && got != tc.in:
			t.Errorf("CleanPath(%q) = %q; want it unchanged", tc.in, got)
		case !tc.ok && err == nil:
			t.Errorf("CleanPath(%q) = %q; want ErrBadPath", tc.in, got)
		case !tc.ok && !errors.Is(err, route.ErrBadPath):
			t.Errorf("CleanPath(%q) error = %v; want ErrBadPath", tc.in, err)
		}
	}
}

// TestCleanPathEmptySegmentBeforeTrailingSlash: the trailing-slash exception
// in CleanPath is applied to every empty segment, not only the last one.
func TestCleanPathEmptySegmentBeforeTrailingSlash(t *testing.T) {
	t.Parallel()
	for _, p := range []string{"/a//b/", "//v2/code/completions/", "/v1/prompts//x/", "/v1//../"} {
		if got, err := route.CleanPath(p); err == nil {
			t.Errorf("CleanPath(%q) = %q; want ErrBadPath", p, got)
		}
	}
}

// TestCleanPathEncodedControlCharacters: CleanPath's contract refuses
// control characters, and it refuses %00, but it lets every other encoded
// control character through, so "/v2/x%0d%0aSet-Cookie:%20a" reaches the
// backend and its logs as CR LF after one unescape.
func TestCleanPathEncodedControlCharacters(t *testing.T) {
	t.Parallel()
	for _, p := range []string{"/v2/x%0d%0aSet-Cookie:%20a", "/v2/%09", "/v2/%1F", "/v2/%7f", "/v2/%01"} {
		if got, err := route.CleanPath(p); err == nil {
			t.Errorf("CleanPath(%q) = %q; want ErrBadPath", p, got)
		}
	}
}

// FuzzCleanPath checks that no path CleanPath accepts can reach a backend
// as a different resource: no "." or ".." segments (nor ".;" or "..;"
// forms), no empty segment except a trailing slash, no encoded slash, dot
// or backslash, no control bytes, no invalid UTF-8, before or after one
// round of unescaping.
func FuzzCleanPath(f *testing.F) {
	for _, tc := range cleanPathCases {
		f.Add(tc.in)
	}
	f.Fuzz(func(t *testing.T, p string) {
		got, err := route.CleanPath(p)
		if err != nil {
			if !errors.Is(err, route.ErrBadPath) {
				t.Fatalf("CleanPath(%q) error %v is not ErrBadPath", p, err)
			}
			return
		}
		if got != p {
			t.Fatalf("CleanPath(%q) = %q; accepted paths are returned unchanged", p, got)
		}
		checkCanonical(t, "escaped", p)
		lower := strings.ToLower(p)
		for _, bad := range []string{"%2f", "%5c", "%2e", "%00", "%25"} {
			if strings.Contains(lower, bad) {
				t.Fatalf("CleanPath accepted %q containing %s", p, bad)
			}
		}
		if u, err := url.PathUnescape(p); err == nil {
			checkCanonical(t, "unescaped", u)
		}
	})
}

func checkCanonical(t *testing.T, what, p string) {
	t.Helper()
	if !strings.HasPrefix(p, "/") {
		t.Fatalf("accepted path, %s %q, is not absolute", what, p)
	}
	if strings.Contains(p, "//") {
		t.Fatalf("accepted path, %s %q, contains //", what, p)
	}
	if strings.ContainsRune(p, '\\') {
		t.Fatalf("accepted path, %s %q, contains a backslash", what, p)
	}
	for i := 0; i < len(p); i++ {
		if p[i] < 0x20 || p[i] == 0x7f {
			t.Fatalf("accepted path, %s %q, contains control byte %#x", what, p, p[i])
		}
	}
	if !utf8.ValidString(p) {
		t.Fatalf("accepted path, %s %q, is not valid UTF-8", what, p)
	}
	if p == "/" {
		return
	}
	segs := strings.Split(p[1:], "/")
	for i, s := range segs {
		switch {
		case s == "." || s == "..":
			t.Fatalf("accepted path, %s %q, has a %q segment", what, p, s)
		case strings.HasPrefix(s, ".;") || strings.HasPrefix(s, "..;"):
			t.Fatalf("accepted path, %s %q, has a dot segment with parameters %q", what, p, s)
		case s == "" && i != len(segs)-1:
			t.Fatalf("accepted path, %s %q, has an empty segment", what, p)
		}
	}
}

func TestStripPrefix(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		path, prefix, want string
		ok                 bool
	}{
		{"/ai/v2/code/completions", "/ai", "/v2/code/completions", true},
		{"/ai", "/ai", "/", true},
		{"/ai/", "/ai", "/", true},
		{"/v2/code/completions", "", "/v2/code/completions", true},
		{"/aix/v2", "/ai", "", false},
		{"/v2/code/completions", "/ai", "", false},
		{"/", "/ai", "", false},
		{"/AI/v2", "/ai", "", false},
		{"/cicd/ai/v2", "/ai", "", false},
	} {
		got, ok := route.StripPrefix(tc.path, tc.prefix)
		if got != tc.want || ok != tc.ok {
			t.Errorf("StripPrefix(%q, %q) = %q, %v; want %q, %v", tc.path, tc.prefix, got, ok, tc.want, tc.ok)
		}
	}
}
