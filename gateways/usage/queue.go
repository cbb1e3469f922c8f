package usage

// queue is a FIFO of events kept in chunks of at most one batch, so the
// writer takes a batch and the spiller takes everything without copying
// events under the lock. It is not safe for concurrent use; the Recorder
// guards it with its mutex.
type queue struct {
	chunks [][]Event
	n      int       // events in chunks
	free   [][]Event // emptied chunks kept for reuse
}

// maxFreeChunks bounds the chunks kept for reuse; steady state needs two.
const maxFreeChunks = 4

// push appends e and reports whether the newest chunk is now a full batch.
func (q *queue) push(e Event, batch int) (full bool) {
	last := len(q.chunks) - 1
	if last < 0 || len(q.chunks[last]) >= batch {
		q.chunks = append(q.chunks, q.newChunk(batch))
		last++
	}
	q.chunks[last] = append(q.chunks[last], e)
	q.n++
	return len(q.chunks[last]) >= batch
}

// pop removes and returns the oldest chunk, or nil when the queue is empty.
// Unless partial is set, the newest chunk is returned only when full.
func (q *queue) pop(batch int, partial bool) []Event {
	if len(q.chunks) == 0 {
		return nil
	}
	c := q.chunks[0]
	if !partial && len(q.chunks) == 1 && len(c) < batch {
		return nil
	}
	q.chunks[0] = nil
	q.chunks = q.chunks[1:]
	q.n -= len(c)
	return c
}

// takeAll removes and returns every chunk and the number of events in them.
func (q *queue) takeAll() ([][]Event, int) {
	cs, n := q.chunks, q.n
	q.chunks, q.n = nil, 0
	return cs, n
}

// pushFront puts chunks taken earlier back at the head of the queue.
func (q *queue) pushFront(cs ...[]Event) {
	for _, c := range cs {
		q.n += len(c)
	}
	q.chunks = append(cs[:len(cs):len(cs)], q.chunks...)
}

// recycle keeps an emptied chunk for reuse, dropping references to its events.
func (q *queue) recycle(c []Event) {
	if len(q.free) >= maxFreeChunks || cap(c) == 0 {
		return
	}
	clear(c)
	q.free = append(q.free, c[:0])
}

// newChunk returns an empty chunk with room for a batch, so appending never
// copies events and the buffer never holds more capacity than BufferSize
// plus one batch.
func (q *queue) newChunk(batch int) []Event {
	if n := len(q.free); n > 0 {
		c := q.free[n-1]
		q.free[n-1] = nil
		q.free = q.free[:n-1]
		return c
	}
	return make([]Event, 0, batch)
}
