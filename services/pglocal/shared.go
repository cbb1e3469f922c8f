package pglocal

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Shared returns a throwaway cluster kept in dir and reused across
// processes: the first caller starts it, later callers (other test
// binaries, later runs) find it through dir/url. It is left running; stop it
// with `pg_ctl -D <dir>/cluster/data stop`.
func Shared(ctx context.Context, dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", dir, err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("open lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("lock %s: %w", dir, err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)

	urlFile := filepath.Join(dir, "url")
	if b, err := os.ReadFile(urlFile); err == nil {
		u := strings.TrimSpace(string(b))
		if Ping(ctx, u) == nil {
			return u, nil
		}
	}
	s, err := Start(ctx)
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(urlFile, []byte(s.URL+"\n"), 0o644); err != nil {
		s.Stop()
		return "", fmt.Errorf("record shared cluster url: %w", err)
	}
	return s.URL, nil
}
