package budget

import "context"

// Sweep runs one pass of Run's idle-return sweep.
func Sweep(ctx context.Context, l *Limiter) []error { return l.sweep(ctx) }

// Prune runs one pass of Run's pruning.
func Prune(ctx context.Context, l *Limiter) (rows int64, more bool, err error) { return l.prune(ctx) }

// SetPruneBatch sets the most rows one prune statement deletes. Call it
// before l is used.
func SetPruneBatch(l *Limiter, n int) { l.pruneBatch = n }

// OnWait makes every Take call f when it is about to wait for a statement.
// Call it before l is used.
func OnWait(l *Limiter, f func()) { l.hooks.wait = f }

// OnPruned makes Run call f after each prune pass. Call it before l is used.
func OnPruned(l *Limiter, f func(rows int64, err error)) { l.hooks.pruned = f }
