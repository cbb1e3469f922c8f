package main

import (
	"encoding/json"
	"io"
	"net/http"
	"time"

	"github.com/hashicorp/golang-lru/v2/expirable"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jwt"

	"github.com/cloud-connector/cloud-connector/gateways/internaltoken"
)

// demoBackend stands in for the AI gateway and the CI/CD service behind the
// gateways: it answers completions as JSON or as a stream of server-sent
// events, chat as NDJSON, and reports the units it used. Like a real
// backend, it serves only requests whose internal token verifies against
// the gateways' published keys (public paths aside).
func demoBackend(keys jwk.Set, accept []tokenFor) http.Handler {
	return requireInternalToken(keys, accept, demoMux())
}

// tokenFor is an issuer (a gateway) and an audience (this backend, under
// one of its names) whose internal tokens the backend accepts.
type tokenFor struct{ issuer, audience string }

// requireInternalToken refuses requests without a valid internal token,
// except on the paths the gateways serve publicly. A gateway reuses a token
// for many requests, so a token that verified is remembered briefly (well
// within the lifetime it still has when a gateway hands it out) instead of
// checking its signature every time.
func requireInternalToken(keys jwk.Set, accept []tokenFor, next http.Handler) http.Handler {
	public := map[string]bool{"/v1/models/definitions": true, "/monitoring/healthz": true, "/monitoring/ready": true}
	verified := expirable.NewLRU[string, time.Time](10_000, nil, 30*time.Second) // token -> its exp
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if public[r.URL.Path] {
			next.ServeHTTP(w, r)
			return
		}
		raw := r.Header.Get(internaltoken.Header)
		if exp, ok := verified.Get(raw); ok && raw != "" && time.Now().Before(exp) {
			next.ServeHTTP(w, r)
			return
		}
		for _, a := range accept {
			if _, err := internaltoken.Verify(raw, keys, a.issuer, a.audience); err == nil {
				// Verified just now, so its claims can be read as they are.
				if t, err := jwt.ParseInsecure([]byte(raw)); err == nil {
					verified.Add(raw, t.Expiration())
				}
				next.ServeHTTP(w, r)
				return
			}
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		json.NewEncoder(w).Encode(map[string]string{"detail": "missing or invalid " + internaltoken.Header})
	})
}

func demoMux() http.Handler {
	mux := http.NewServeMux()
	completion := "bool:\n    return n % 2 == 0\n"
	mux.HandleFunc("POST /v2/code/completions", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Stream      bool `json:"stream"`
			CurrentFile struct {
				FileName string `json:"file_name"`
			} `json:"current_file"`
		}
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnprocessableEntity)
			json.NewEncoder(w).Encode(map[string]string{"detail": "invalid JSON body: " + err.Error()})
			return
		}
		// The completion as a model streams it, token by token.
		tokens := []string{"bool", ":", "\n", "    return", " n", " %", " 2", " ==", " 0", "\n"}
		w.Header().Set("X-Cloud-Connector-Units", "12")
		if !req.Stream {
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(map[string]any{
				"id":      "demo-completion",
				"model":   map[string]string{"engine": "demo", "name": "demo-code-model", "lang": "python"},
				"choices": []map[string]any{{"text": completion, "index": 0, "finish_reason": "length"}},
			})
			return
		}
		// A token at a time, as a model would produce them.
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		rc := http.NewResponseController(w)
		for _, tok := range tokens {
			b, _ := json.Marshal(tok)
			io.WriteString(w, "data: "+string(b)+"\n\n")
			rc.Flush()
			select {
			case <-r.Context().Done():
				return
			case <-time.After(150 * time.Millisecond):
			}
		}
	})
	mux.HandleFunc("POST /v2/chat/agent", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		rc := http.NewResponseController(w)
		enc := json.NewEncoder(w)
		for i, part := range []string{"Hello", " from", " the", " demo", " backend."} {
			enc.Encode(map[string]any{"type": "content_chunk", "index": i, "content": part})
			rc.Flush()
			time.Sleep(100 * time.Millisecond)
		}
	})
	mux.HandleFunc("GET /v1/models/definitions", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"models":[{"name":"demo-code-model","provider":"demo"}]}`)
	})
	mux.HandleFunc("GET /monitoring/healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"status":"ok"}`)
	})
	mux.HandleFunc("POST /v1/runners/jobs", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"job":null,"retry_in_seconds":5}`)
	})
	return mux
}
