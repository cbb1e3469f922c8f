package usage

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
)

const (
	spoolExt = ".jsonl"
	tmpExt   = ".tmp"
	// maxLineBytes bounds one spooled event; a normalized event is far
	// smaller, so a longer line is corruption.
	maxLineBytes = 64 << 10
)

// spool is a directory of spill files: each holds the events of one spill as
// JSON lines and is written once, fsync'd, then renamed into place, so a file
// with the spool extension is complete. Files are replayed oldest first.
type spool struct {
	dir   string
	seq   atomic.Uint64
	bytes atomic.Int64    // size of the spool files, set-aside ones included
	skip  map[string]bool // unreadable files replay ignores; used by Run only
}

// spoolRecord is the on-disk form of an Event. It has Event's fields, so the
// two convert into each other, and a change to Event fails to compile here
// until the format is decided.
type spoolRecord struct {
	ID             uuid.UUID     `json:"id"`
	OccurredAt     time.Time     `json:"occurred_at"`
	OrganizationID string        `json:"organization_id,omitempty"`
	InstanceID     string        `json:"instance_id"`
	Realm          string        `json:"realm"`
	GlobalUserID   string        `json:"global_user_id,omitempty"`
	Feature        string        `json:"feature"`
	Gateway        string        `json:"gateway"`
	Route          string        `json:"route"`
	Method         string        `json:"method"`
	Status         int           `json:"status"`
	Duration       time.Duration `json:"duration_ns"`
	RequestBytes   int64         `json:"request_bytes"`
	ResponseBytes  int64         `json:"response_bytes"`
	Units          *int64        `json:"units,omitempty"`
	RequestID      string        `json:"request_id,omitempty"`
	GitLabVersion  string        `json:"gitlab_version,omitempty"`
	ClientType     string        `json:"client_type,omitempty"`
}

// openSpool creates dir if needed. A .tmp file found there is a spill that a
// crashed process did not finish; its complete lines hold events that exist
// nowhere else, so it is renamed for replay, which skips a torn last line.
func openSpool(dir string) (*spool, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create usage spool: %w", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read usage spool: %w", err)
	}
	s := &spool{dir: dir, skip: map[string]bool{}}
	for _, e := range entries {
		if name := e.Name(); strings.HasSuffix(name, spoolExt+tmpExt) {
			path := filepath.Join(dir, name)
			if err := os.Rename(path, strings.TrimSuffix(path, tmpExt)); err != nil {
				return nil, fmt.Errorf("recover usage spool file: %w", err)
			}
		}
		if info, err := e.Info(); err == nil && info.Mode().IsRegular() {
			s.bytes.Add(info.Size())
		}
	}
	return s, nil
}

// write stores the events of chunks in a new spool file and fsyncs it and
// the directory before returning nil.
func (s *spool) write(chunks [][]Event) (err error) {
	name := fmt.Sprintf("usage-%020d-%d-%d%s", time.Now().UnixNano(), os.Getpid(), s.seq.Add(1), spoolExt)
	path := filepath.Join(s.dir, name)
	tmp := path + tmpExt
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create spool file: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	w := bufio.NewWriterSize(f, 64<<10)
	enc := json.NewEncoder(w)
	for _, c := range chunks {
		for i := range c {
			if err := enc.Encode(spoolRecord(c[i])); err != nil {
				return fmt.Errorf("encode spooled event: %w", err)
			}
		}
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("write spool file: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync spool file: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close spool file: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename spool file: %w", err)
	}
	if info, err := os.Stat(path); err == nil {
		s.bytes.Add(info.Size())
	}
	return syncDir(s.dir)
}

// files lists the complete spool files, oldest first.
func (s *spool) files() ([]string, error) {
	entries, err := os.ReadDir(s.dir) // sorted by name, so by time of spill
	if err != nil {
		return nil, fmt.Errorf("read usage spool: %w", err)
	}
	var paths []string
	for _, e := range entries {
		path := filepath.Join(s.dir, e.Name())
		if e.Type().IsRegular() && strings.HasSuffix(path, spoolExt) && !s.skip[path] {
			paths = append(paths, path)
		}
	}
	return paths, nil
}

// remove deletes a replayed file. If the deletion is lost in a crash the
// file is replayed again, which the idempotent insert makes harmless.
func (s *spool) remove(path string) error {
	info, statErr := os.Stat(path)
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove spool file: %w", err)
	}
	if statErr == nil {
		s.bytes.Add(-info.Size())
	}
	return syncDir(s.dir)
}

// read calls fn with the events of the spool file at path in batches of at
// most batch, stopping at fn's first error. It returns the number of lines it
// could not decode: a torn last line from a crash, or damage.
func (s *spool) read(path string, batch int, fn func([]Event) error) (corrupt int, err error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("open spool file: %w", err)
	}
	defer f.Close()
	br := bufio.NewReaderSize(f, maxLineBytes)
	events := make([]Event, 0, batch)
	now := time.Now()
	for {
		line, tooLong, rerr := nextLine(br)
		if rerr != nil && rerr != io.EOF {
			return corrupt, fmt.Errorf("read spool file: %w", rerr)
		}
		if line = bytes.TrimSpace(line); tooLong || len(line) > 0 {
			var rec spoolRecord
			if tooLong || json.Unmarshal(line, &rec) != nil || rec.ID == uuid.Nil || rec.OccurredAt.IsZero() {
				corrupt++
			} else {
				// Checked when recorded; again in case the file predates
				// a rule or the clock has gone back since. Not against the
				// past: a spooled event may be days old.
				e := Event(rec)
				normalize(&e, now, false)
				events = append(events, e)
			}
		}
		if len(events) == batch || (rerr == io.EOF && len(events) > 0) {
			if err := fn(events); err != nil {
				return corrupt, err
			}
			events = events[:0]
		}
		if rerr == io.EOF {
			return corrupt, nil
		}
	}
}

// nextLine returns the next line. A line longer than br's buffer is skipped
// and reported as too long.
func nextLine(br *bufio.Reader) (line []byte, tooLong bool, err error) {
	line, err = br.ReadSlice('\n')
	for err == bufio.ErrBufferFull {
		line, tooLong = nil, true
		_, err = br.ReadSlice('\n')
	}
	return line, tooLong, err
}

// badExt marks a spool file that could not be read.
const badExt = ".bad"

// setAside keeps an unreadable spool file for an operator and out of the way
// of replay: renamed if possible, else skipped until the process restarts.
func (s *spool) setAside(path string) error {
	s.skip[path] = true
	if err := os.Rename(path, path+badExt); err != nil {
		return fmt.Errorf("set aside spool file: %w", err)
	}
	delete(s.skip, path)
	return nil
}

// syncDir makes renames and removals in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open spool dir: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync spool dir: %w", err)
	}
	return nil
}
