package route

import (
	"errors"
	"net/url"
	"strings"
	"unicode/utf8"
)

// ErrBadPath is returned by CleanPath for paths a gateway refuses.
var ErrBadPath = errors.New("invalid request path")

// CleanPath checks a request's escaped path and returns it unchanged when
// it is canonical: absolute; no empty segment except a final trailing
// slash; no "." or ".." segment, nor one that is empty, "." or ".." once
// path parameters are cut off (";", raw or encoded: Tomcat, Jetty and
// Spring drop them, then resolve the dots); no backslash or control
// character (C0 or C1), raw or encoded; no encoded slash, dot or percent
// sign (double encoding); no raw non-ASCII byte; valid UTF-8 once decoded
// (lax decoders read overlong forms such as %C0%AE as "."). Requests are
// refused rather than normalized so that the gateway, the policy and the
// backend can never disagree about which resource was asked for.
func CleanPath(escaped string) (string, error) {
	if !strings.HasPrefix(escaped, "/") || len(escaped) > 2048 {
		return "", ErrBadPath
	}
	for i := 0; i < len(escaped); i++ {
		c := escaped[i]
		switch {
		case c < 0x20 || c == 0x7f || c == '\\' || c >= 0x80:
			// Non-ASCII must be percent-encoded, as url.URL.EscapedPath
			// does: raw bytes are read as UTF-8 or Latin-1 at will.
			return "", ErrBadPath
		case c == '%':
			if i+2 >= len(escaped) {
				return "", ErrBadPath
			}
			hi, ok1 := unhex(escaped[i+1])
			lo, ok2 := unhex(escaped[i+2])
			if !ok1 || !ok2 {
				return "", ErrBadPath
			}
			switch b := hi<<4 | lo; {
			case b < 0x20, b == 0x7f, b == '/', b == '\\', b == '.', b == '%':
				return "", ErrBadPath
			}
			i += 2
		}
	}
	if escaped == "/" {
		return escaped, nil
	}
	// Every escape is valid and none is a slash, so the decoded path has
	// the same segments, and they are what the backend reads.
	decoded, err := url.PathUnescape(escaped)
	if err != nil || !utf8.ValidString(decoded) {
		return "", ErrBadPath
	}
	for _, r := range decoded {
		if r >= 0x80 && r <= 0x9f { // C1 controls (NEL ends a line for some)
			return "", ErrBadPath
		}
	}
	segs := strings.Split(decoded[1:], "/")
	for i, seg := range segs {
		if seg == "" && i == len(segs)-1 {
			continue // trailing slash
		}
		if name, _, _ := strings.Cut(seg, ";"); name == "" || name == "." || name == ".." {
			return "", ErrBadPath
		}
	}
	return escaped, nil
}

func unhex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// StripPrefix removes prefix ("/ai") from path when path is the prefix or
// lies under it, reporting whether it did.
func StripPrefix(path, prefix string) (string, bool) {
	if prefix == "" {
		return path, true
	}
	if path == prefix {
		return "/", true
	}
	if strings.HasPrefix(path, prefix+"/") {
		return path[len(prefix):], true
	}
	return "", false
}
