package usage

import (
	"context"
	"errors"
	"io/fs"
	"sync"
	"time"
)

// ready is a closed channel: a select on it proceeds at once.
var ready = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// Run writes queued events until ctx is done or Close is called, and returns
// nil then. It ensures usage_events partitions at start and daily, and after
// a failed check again within a minute, doubling up to an hour. It replays
// the spool at start and after each successful write, and spills the buffer
// to the spool when it runs high. A batch that fails is retried after
// RetryBackoff, doubling up to 30s, and kept until written.
//
// Run may be called once; a second call returns an error, and a call after
// Close returns nil at once. When Run returns, events still queued stay in
// memory for Close.
func (r *Recorder) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	r.mu.Lock()
	switch {
	case r.isClosed:
		r.mu.Unlock()
		return nil
	case r.running:
		r.mu.Unlock()
		return errors.New("usage: Run called more than once")
	}
	r.running, r.cancelRun = true, cancel
	r.mu.Unlock()

	var wg sync.WaitGroup
	if r.spool != nil {
		wg.Go(func() { r.spillLoop(ctx) })
	}
	var pending []Event // the batch taken from the queue and not yet committed
	defer func() {
		cancel()
		wg.Wait()
		if pending != nil {
			r.mu.Lock()
			r.q.pushFront(pending)
			r.inflight = 0
			r.mu.Unlock()
		}
		close(r.runDone)
	}()

	partitions := time.NewTimer(r.ensurePartitions(ctx))
	defer partitions.Stop()
	flush := time.NewTicker(r.cfg.FlushInterval)
	defer flush.Stop()

	var (
		more    <-chan struct{} // ready while the spool has files to replay
		retry   <-chan time.Time
		backoff = r.cfg.RetryBackoff
		failing bool
	)
	if r.spool != nil {
		more = ready // replay at start
	}
	for {
		r.report(time.Now())
		all := false
		select {
		case <-ctx.Done():
			return nil
		case <-r.stopping:
			return nil
		case <-partitions.C:
			partitions.Reset(r.ensurePartitions(ctx))
			continue
		case <-flush.C:
			if failing {
				continue // wait for the retry
			}
			all = true
		case <-r.flushC:
			if failing {
				continue
			}
		case <-more:
		case <-retry:
			all = true
		}

		var err error
		pending, err = r.pump(ctx, pending, all)
		more = nil
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			r.m.flushErrors.Inc()
			r.dbDown.Store(true)
			r.log.Warn("usage: write failed; retrying", "error", err, "retry_in", backoff)
			retry = time.After(backoff)
			backoff = min(2*backoff, maxBackoff)
			failing = true
			continue
		}
		if failing {
			r.log.Info("usage: writes recovered")
			r.dbDown.Store(false)
			failing, retry, backoff = false, nil, r.cfg.RetryBackoff
		}
		if r.spool != nil && r.spoolPending.Load() {
			more = ready
		}
	}
}

// pump writes pending, then the queued batches (only full ones unless all is
// set), then replays one spool file. On failure it returns the batch to retry.
// It takes no more batches than were queued when it started, so a steady
// stream of events cannot keep it from returning to Run's loop.
func (r *Recorder) pump(ctx context.Context, pending []Event, all bool) ([]Event, error) {
	r.mu.Lock()
	limit := len(r.q.chunks)
	r.mu.Unlock()
	if pending != nil {
		if err := r.commit(ctx, pending); err != nil {
			return pending, err
		}
	}
	for range limit {
		r.mu.Lock()
		pending = r.q.pop(r.cfg.BatchSize, all)
		r.inflight = len(pending)
		r.mu.Unlock()
		if pending == nil {
			break
		}
		if err := r.commit(ctx, pending); err != nil {
			return pending, err
		}
	}
	if r.spool != nil && r.spoolPending.Load() {
		return nil, r.replayOne(ctx)
	}
	return nil, nil
}

// commit writes batch, the one in flight, and releases it once committed.
func (r *Recorder) commit(ctx context.Context, batch []Event) error {
	if err := r.write(ctx, batch, r.m.written); err != nil {
		return err
	}
	r.mu.Lock()
	r.inflight = 0
	r.q.recycle(batch)
	r.mu.Unlock()
	return nil
}

// replayOne writes the events of the oldest spool file and then deletes it.
// It returns only database errors; the file stays and is replayed again
// later. Problems with the file itself are logged.
func (r *Recorder) replayOne(ctx context.Context) error {
	// Cleared before listing: a spill that lands after the listing sets it
	// again, so no file is forgotten.
	r.spoolPending.Store(false)
	paths, err := r.spool.files()
	if err != nil {
		r.log.Error("usage: replay spool", "error", err)
		return nil
	}
	if len(paths) == 0 {
		return nil
	}
	if len(paths) > 1 {
		r.spoolPending.Store(true)
	}
	path := paths[0]
	var dbErr error
	corrupt, err := r.spool.read(path, r.cfg.BatchSize, func(events []Event) error {
		dbErr = r.write(ctx, events, r.m.replayed)
		return dbErr
	})
	switch {
	case dbErr != nil:
		r.spoolPending.Store(true)
		return dbErr
	case errors.Is(err, fs.ErrNotExist):
		return nil // replayed and removed meanwhile
	case err != nil:
		// Unreadable: keep it for an operator rather than retry forever.
		r.log.Error("usage: replay spool file; setting it aside", "file", path, "error", err)
		if rerr := r.spool.setAside(path); rerr != nil {
			r.log.Error("usage: set aside spool file", "file", path, "error", rerr)
		}
		return nil
	}
	if corrupt > 0 {
		r.drop(r.m.droppedCorrupt, corrupt)
		r.log.Warn("usage: skipped undecodable spooled events", "file", path, "events", corrupt)
	}
	if err := r.spool.remove(path); err != nil {
		// Its events are stored; replaying it again each round would only
		// repeat them, so skip it until restart.
		r.spool.skip[path] = true
		r.log.Error("usage: replay spool", "error", err)
	}
	r.log.Info("usage: replayed spool file", "file", path)
	return nil
}

// spillLoop moves the buffer to the spool whenever Record reports it high,
// until ctx is done.
func (r *Recorder) spillLoop(ctx context.Context) {
	backoff := r.cfg.RetryBackoff
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.spillC:
		}
		if err := r.spill(); err != nil {
			r.log.Error("usage: spool events; retrying", "error", err, "retry_in", backoff)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, maxBackoff)
			signal(r.spillC)
			continue
		}
		backoff = r.cfg.RetryBackoff
	}
}

// spill writes every queued event (not the batch in flight) to a new spool
// file if the buffer is at its high-water mark. The events count as held
// until they are on disk; if writing fails they go back to the queue.
//
// Once the spool has reached SpoolMaxBytes it takes no more: events stay in
// memory until replay makes room, and when memory is full too, Record drops
// new ones (counted as buffer_full). The oldest events are kept; a spool
// that outgrew its volume would get the pod evicted and lose them all.
func (r *Recorder) spill() error {
	if size := r.spool.bytes.Load(); size >= r.cfg.SpoolMaxBytes {
		if !r.spoolFull.Swap(true) {
			r.log.Error("usage: spool full; holding events in memory until the database takes them",
				"spool_bytes", size, "max_bytes", r.cfg.SpoolMaxBytes, "dir", r.spool.dir)
		}
		return nil
	}
	r.spoolFull.Store(false)
	r.mu.Lock()
	if r.q.n+r.inflight < r.highWater || r.q.n == 0 {
		r.mu.Unlock()
		return nil
	}
	chunks, n := r.q.takeAll()
	r.spilling = n
	r.mu.Unlock()

	err := r.spool.write(chunks)

	r.mu.Lock()
	r.spilling = 0
	if err != nil {
		r.q.pushFront(chunks...)
	} else {
		for _, c := range chunks {
			r.q.recycle(c)
		}
	}
	r.mu.Unlock()
	if err != nil {
		return err
	}
	r.m.spooled.Add(float64(n))
	r.spoolPending.Store(true)
	r.log.Warn("usage: buffer high; spooled events", "events", n, "dir", r.spool.dir)
	return nil
}
