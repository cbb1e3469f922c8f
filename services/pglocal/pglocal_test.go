package pglocal_test

import (
	"context"
	"testing"

	"github.com/cloud-connector/cloud-connector/services/pglocal"
)

// TestStart starts a real throwaway cluster from the local installation,
// the path developers without a running server depend on.
func TestStart(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("starts a PostgreSQL cluster")
	}
	ctx := context.Background()
	s, err := pglocal.Start(ctx)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	if !s.Started {
		t.Fatal("Started = false for a cluster Start created")
	}
	if err := pglocal.Ping(ctx, s.URL); err != nil {
		t.Fatalf("Ping started cluster: %v", err)
	}
	if err := s.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if err := pglocal.Ping(ctx, s.URL); err == nil {
		t.Fatal("cluster still answers after Stop")
	}
}

func TestWithDatabase(t *testing.T) {
	t.Parallel()
	got, err := pglocal.WithDatabase("postgres://u@h:5/postgres?sslmode=disable", "other")
	if err != nil {
		t.Fatal(err)
	}
	if want := "postgres://u@h:5/other?sslmode=disable"; got != want {
		t.Fatalf("WithDatabase = %q, want %q", got, want)
	}
}
