// Package usage records one usage event per proxied request in PostgreSQL
// (table usage_events), for analysts.
//
// A Recorder is a write-behind buffer. The request path calls Record, which
// never blocks and does no I/O. Run batches queued events into usage_events,
// one INSERT per batch; the event id is the idempotency key, so a batch that is
// retried, or replayed from the spool twice, never counts an event twice.
//
// Memory is bounded by Config.BufferSize. When the database is down or cannot
// keep up, events wait in memory; once the buffer reaches three quarters of
// BufferSize they are spilled to the spool directory (Config.SpoolDir), and
// Close spools whatever the database refuses at shutdown. Spooled events are
// replayed into the database at start and after every successful write, and a
// spool file is deleted only after all of its events are committed. Without a
// spool, an event that finds the buffer full is dropped and counted.
//
// Spool files are JSON lines named usage-*.jsonl. A file ending in .jsonl.tmp
// is a spill still being written; one left by a crashed process is replayed
// at the next New. A spool directory must not be shared by two processes
// running at the same time.
//
// Lifecycle:
//
//	rec, err := usage.New(pool, cfg, logger)
//	go rec.Run(ctx)          // ctx may be cancelled at shutdown, or not
//	...                      // request path: rec.Record(event)
//	err = rec.Close(stopCtx) // always: writes or spools what is queued
//
// Close must be called in every case: cancelling Run's context stops the
// background writing but leaves queued events in memory until Close.
package usage

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus"
)

// DB is satisfied by *pgxpool.Pool, *pgx.Conn and pgx.Tx. A Recorder uses it
// from one goroutine at a time, so a single connection will do.
type DB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Event is one proxied request, as stored in usage_events.
type Event struct {
	ID             uuid.UUID // set by the caller once per request (uuid.NewV7); the idempotency key
	OccurredAt     time.Time // request arrival, UTC
	OrganizationID string    // "" when the instance has no organization

	InstanceID, Realm, GlobalUserID string
	Feature, Gateway, Route, Method string

	Status                      int
	Duration                    time.Duration
	RequestBytes, ResponseBytes int64
	Units                       *int64 // backend-reported units, nil when none

	RequestID, GitLabVersion, ClientType string
}

// Config tunes a Recorder. Zero values take the documented defaults; negative
// values are invalid.
type Config struct {
	BatchSize     int                   // max events per INSERT (default 500, or BufferSize if smaller)
	FlushInterval time.Duration         // max time an event waits in memory while the database is healthy (default 1s)
	BufferSize    int                   // max events held in memory, including the batch being written (default 50_000)
	SpoolDir      string                // "" = no spool
	SpoolMaxBytes int64                 // spool size at which spilling stops (default 512 MiB); see spill
	RetryBackoff  time.Duration         // first retry delay after a failed flush, doubling up to 30s (default 500ms)
	WriteTimeout  time.Duration         // max time one database statement may take (default 10s)
	Registerer    prometheus.Registerer // optional
}

const (
	defaultBatchSize     = 500
	defaultFlushInterval = time.Second
	defaultBufferSize    = 50_000
	defaultRetryBackoff  = 500 * time.Millisecond
	defaultWriteTimeout  = 10 * time.Second
	// defaultSpoolMaxBytes stays well inside the 1 GiB emptyDir of the
	// Kubernetes manifests: a pod that outgrows it is evicted, and its
	// whole spool lost with it.
	defaultSpoolMaxBytes = 512 << 20

	// maxBackoff caps the retry delay, so a recovered database is noticed
	// within half a minute.
	maxBackoff = 30 * time.Second
)

// withDefaults returns c with zero fields set to their defaults.
func (c Config) withDefaults() Config {
	if c.BatchSize == 0 {
		c.BatchSize = defaultBatchSize
		if c.BufferSize > 0 {
			c.BatchSize = min(c.BatchSize, c.BufferSize)
		}
	}
	if c.FlushInterval == 0 {
		c.FlushInterval = defaultFlushInterval
	}
	if c.BufferSize == 0 {
		c.BufferSize = max(defaultBufferSize, c.BatchSize)
	}
	if c.RetryBackoff == 0 {
		c.RetryBackoff = defaultRetryBackoff
	}
	if c.WriteTimeout == 0 {
		c.WriteTimeout = defaultWriteTimeout
	}
	if c.SpoolMaxBytes == 0 {
		c.SpoolMaxBytes = defaultSpoolMaxBytes
	}
	return c
}

func (c Config) validate() error {
	switch {
	case c.BatchSize < 0:
		return errors.New("BatchSize must not be negative")
	case c.BufferSize < 0:
		return errors.New("BufferSize must not be negative")
	case c.BatchSize > c.BufferSize:
		return fmt.Errorf("BatchSize (%d) must not exceed BufferSize (%d)", c.BatchSize, c.BufferSize)
	case c.FlushInterval < 0:
		return errors.New("FlushInterval must not be negative")
	case c.RetryBackoff < 0 || c.RetryBackoff > maxBackoff:
		return fmt.Errorf("RetryBackoff must be between 0 and %s", maxBackoff)
	case c.WriteTimeout < 0:
		return errors.New("WriteTimeout must not be negative")
	case c.SpoolMaxBytes < 0:
		return errors.New("SpoolMaxBytes must not be negative")
	}
	return nil
}

// Recorder queues usage events in memory and writes them to usage_events in
// the background. Its methods are safe for concurrent use.
type Recorder struct {
	db        DB
	cfg       Config
	log       *slog.Logger
	m         *metrics
	spool     *spool // nil without a spool directory
	highWater int    // held events at which the buffer is spilled to the spool

	flushC   chan struct{} // a full batch is queued
	spillC   chan struct{} // held events reached highWater
	stopping chan struct{} // closed by Close: Run returns
	runDone  chan struct{} // closed when Run has returned
	closed   chan struct{} // closed when Close has finished

	unlogged     atomic.Int64 // events dropped since the last log line
	corrected    atomic.Int64 // events corrected since the last log line
	spoolPending atomic.Bool  // the spool may hold files to replay
	spoolFull    atomic.Bool  // the spool reached SpoolMaxBytes (logged once per episode)
	dbDown       atomic.Bool  // the last write failed
	lastReport   time.Time    // owned by Run, then by Close
	cols         columns      // owned by Run, then by Close
	refused      refusedSet   // owned by Run, then by Close

	partitionRetry   time.Duration // first delay before ensuring partitions again after a failure
	partitionBackoff time.Duration // the next such delay; owned by Run

	mu        sync.Mutex
	q         queue
	inflight  int  // events taken by the writer, not yet committed
	spilling  int  // events taken by the spiller, not yet on disk
	isClosed  bool // Close was called: Record drops
	running   bool // Run was called
	cancelRun context.CancelFunc
}

// New returns a Recorder writing to db. It creates cfg.SpoolDir if needed.
// A nil logger discards logs.
func New(db DB, cfg Config, logger *slog.Logger) (*Recorder, error) {
	if db == nil {
		return nil, errors.New("usage: nil DB")
	}
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("usage config: %w", err)
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	r := &Recorder{
		db:        db,
		cfg:       cfg,
		log:       logger,
		highWater: max(1, cfg.BufferSize-cfg.BufferSize/4),
		flushC:    make(chan struct{}, 1),
		spillC:    make(chan struct{}, 1),
		stopping:  make(chan struct{}),
		runDone:   make(chan struct{}),
		closed:    make(chan struct{}),

		partitionRetry:   partitionRetryMin,
		partitionBackoff: partitionRetryMin,
	}
	if cfg.SpoolDir != "" {
		sp, err := openSpool(cfg.SpoolDir)
		if err != nil {
			return nil, err
		}
		r.spool = sp
		r.spoolPending.Store(true)
	}
	m, err := newMetrics(cfg.Registerer, r.held, func() float64 {
		if r.spool == nil {
			return 0
		}
		return float64(r.spool.bytes.Load())
	})
	if err != nil {
		return nil, err
	}
	r.m = m
	return r, nil
}

// Record queues e for writing. It never blocks and does no I/O. Safe for
// concurrent use.
//
// Record keeps a copy of e (including *Units). Values the database would
// refuse are corrected rather than refused (see normalize): a zero ID gets a
// new UUIDv7, a zero OccurredAt becomes now, negative numbers become 0, an
// organization id that is not a UUID becomes "", and text is made valid
// UTF-8 without NUL bytes and cut to 1 KiB. An OccurredAt more than an hour
// ahead of now, or more than an hour before the request can have started
// (now - Duration), becomes now and is counted by direction. The event is
// dropped and counted when the buffer is full or the Recorder is closed.
func (r *Recorder) Record(e Event) {
	if f := normalize(&e, time.Now(), true); f != 0 {
		r.m.corrected.Inc()
		r.corrected.Add(1)
		if f&fixedFuture != 0 {
			r.m.timeFuture.Inc()
		}
		if f&fixedPast != 0 {
			r.m.timePast.Inc()
		}
	}
	r.mu.Lock()
	if r.isClosed {
		r.mu.Unlock()
		r.drop(r.m.droppedClosed, 1)
		return
	}
	held := r.q.n + r.inflight + r.spilling
	if held >= r.cfg.BufferSize {
		r.mu.Unlock()
		r.drop(r.m.droppedFull, 1)
		return
	}
	full := r.q.push(e, r.cfg.BatchSize)
	r.mu.Unlock()

	r.m.recorded.Inc()
	if full {
		signal(r.flushC)
	}
	if r.spool != nil && held+1 >= r.highWater {
		signal(r.spillC)
	}
}

// Close stops accepting events, stops Run, writes everything queued and
// returns. Events the database refuses are spooled; with no spool, writing is
// retried until ctx expires. When ctx expires first, Close interrupts Run and
// spools the rest.
//
// Close may be called before or after Run's context is cancelled, or without
// Run ever having started. It returns nil when every event recorded was
// written or spooled, and an error when events were lost. Calls after the
// first wait for it and return nil.
func (r *Recorder) Close(ctx context.Context) error {
	r.mu.Lock()
	if r.isClosed {
		r.mu.Unlock()
		select {
		case <-r.closed:
		case <-ctx.Done():
		}
		return nil
	}
	r.isClosed = true
	running, cancelRun := r.running, r.cancelRun
	r.mu.Unlock()
	defer close(r.closed)

	close(r.stopping)
	if running {
		select {
		case <-r.runDone:
		case <-ctx.Done():
			// Interrupt the statement in flight; Run puts its batch back.
			cancelRun()
			<-r.runDone
		}
	}
	return r.drain(ctx)
}

// drain writes or spools everything queued. Run has returned and Record
// drops, so nothing else touches the queue.
func (r *Recorder) drain(ctx context.Context) error {
	r.mu.Lock()
	chunks, n := r.q.takeAll()
	r.inflight = n
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		r.inflight = 0
		r.mu.Unlock()
		r.report(time.Time{})
	}()

	// If Run saw the database failing, do not spend the shutdown budget on it.
	tryDB := r.spool == nil || !r.dbDown.Load()
	backoff := r.cfg.RetryBackoff
	var lastErr error
	for tryDB && len(chunks) > 0 && ctx.Err() == nil {
		err := r.write(ctx, chunks[0], r.m.written)
		if err == nil {
			n -= len(chunks[0])
			chunks = chunks[1:]
			continue
		}
		lastErr = err
		r.m.flushErrors.Inc()
		if r.spool != nil {
			r.log.Warn("usage: write at close failed; spooling", "error", err, "events", n)
			break
		}
		r.log.Warn("usage: write at close failed; retrying", "error", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
	if n == 0 {
		return nil
	}
	if r.spool != nil {
		if err := r.spool.write(chunks); err != nil {
			r.drop(r.m.droppedShutdown, n)
			return fmt.Errorf("usage: %d events lost at close: %w", n, err)
		}
		r.m.spooled.Add(float64(n))
		r.log.Info("usage: spooled events at close", "events", n, "dir", r.spool.dir)
		return nil
	}
	r.drop(r.m.droppedShutdown, n)
	if lastErr == nil {
		lastErr = ctx.Err()
	}
	return fmt.Errorf("usage: %d events lost at close: %w", n, lastErr)
}

// held reports the events in memory, for the buffer gauge.
func (r *Recorder) held() float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return float64(r.q.n + r.inflight + r.spilling)
}

// drop counts n lost events; Run logs them at most once per reportEvery.
func (r *Recorder) drop(c prometheus.Counter, n int) {
	c.Add(float64(n))
	r.unlogged.Add(int64(n))
}

// reportEvery bounds how often dropped and corrected events are logged.
const reportEvery = 10 * time.Second

// report logs events dropped or corrected since the last report, at most
// once per reportEvery; a zero now forces the report.
func (r *Recorder) report(now time.Time) {
	if !now.IsZero() && now.Sub(r.lastReport) < reportEvery {
		return
	}
	dropped, corrected := r.unlogged.Swap(0), r.corrected.Swap(0)
	if dropped > 0 {
		r.log.Warn("usage: events dropped", "events", dropped)
	}
	if corrected > 0 {
		r.log.Warn("usage: invalid events corrected", "events", corrected)
	}
	if dropped > 0 || corrected > 0 {
		r.lastReport = now
	}
}

// signal wakes the goroutine waiting on c without blocking.
func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}
