package gateway

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"sync/atomic"
)

// recorder notes the status and counts the bytes of a response on its way
// to the client. It does not buffer: flushes reach the underlying writer
// through Unwrap (http.ResponseController). A hijacked connection (an
// upgrade such as WebSocket) is counted in both directions.
type recorder struct {
	http.ResponseWriter
	status   int
	bytes    int64
	hijacked *countingConn
}

func (w *recorder) WriteHeader(code int) {
	// 1xx answers are informational, except 101 which ends HTTP.
	if w.status == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *recorder) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(b)
	w.bytes += int64(n)
	return n, err
}

func (w *recorder) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// Hijack takes over the connection for a protocol switch. The proxy writes
// the 101 itself on the raw connection, so the status is noted here.
func (w *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	w.status = http.StatusSwitchingProtocols
	w.hijacked = &countingConn{Conn: conn}
	return w.hijacked, brw, nil
}

// sent returns the response bytes written, including after a hijack.
func (w *recorder) sent() int64 {
	if w.hijacked != nil {
		return w.bytes + w.hijacked.out.Load()
	}
	return w.bytes
}

// received returns bytes read from a hijacked connection.
func (w *recorder) received() int64 {
	if w.hijacked != nil {
		return w.hijacked.in.Load()
	}
	return 0
}

// countingConn counts a hijacked connection's traffic; its two directions
// are copied by different goroutines.
type countingConn struct {
	net.Conn
	in, out atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.in.Add(int64(n))
	return n, err
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.out.Add(int64(n))
	return n, err
}

// counter counts the bytes of a request body read by the proxy.
type counter struct {
	io.ReadCloser
	n int64
}

func (c *counter) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.n += int64(n)
	return n, err
}
