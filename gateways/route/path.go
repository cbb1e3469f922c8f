package route

import (
	"errors"
	"strings"
)

// ErrBadPath is returned by CleanPath for paths a gateway refuses.
var ErrBadPath = errors.New("invalid request path")

// CleanPath checks a request's escaped path and returns it unchanged when
// it is canonical: absolute, no empty, "." or ".." segments, no encoded
// slash, backslash, dot or control characters. Requests are refused rather
// than normalized so that the gateway, the policy and the backend can never
// disagree about which resource was asked for.
func CleanPath(escaped string) (string, error) {
	if !strings.HasPrefix(escaped, "/") || len(escaped) > 2048 {
		return "", ErrBadPath
	}
	for i := 0; i < len(escaped); i++ {
		c := escaped[i]
		switch {
		case c < 0x20 || c == 0x7f || c == '\\':
			return "", ErrBadPath
		case c == '%':
			if i+2 >= len(escaped) {
				return "", ErrBadPath
			}
			switch strings.ToLower(escaped[i+1 : i+3]) {
			case "2f", "5c", "2e", "00":
				return "", ErrBadPath
			}
		}
	}
	if escaped == "/" {
		return escaped, nil
	}
	for _, seg := range strings.Split(escaped[1:], "/") {
		switch seg {
		case "", ".", "..":
			// A trailing slash is the one empty segment allowed.
			if seg == "" && strings.HasSuffix(escaped, "/") && !strings.HasSuffix(escaped, "//") {
				continue
			}
			return "", ErrBadPath
		}
	}
	return escaped, nil
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
