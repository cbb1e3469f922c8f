package budget

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

func TestMayHaveApplied(t *testing.T) {
	t.Parallel()
	for name, tc := range map[string]struct {
		err  error
		want bool
	}{
		"server error":             {&pgconn.PgError{Code: "42P01"}, false},
		"wrapped server error":     {fmt.Errorf("return budget: %w", &pgconn.PgError{Code: "57014"}), false},
		"deadline passed":          {context.DeadlineExceeded, true},
		"canceled":                 {fmt.Errorf("lease: %w", context.Canceled), true},
		"connection lost mid-call": {errors.New("unexpected EOF"), true},
		"no connection in time":    {fmt.Errorf("return budget: %w", notSentError{context.DeadlineExceeded}), false},
	} {
		if got := mayHaveApplied(tc.err); got != tc.want {
			t.Errorf("%s: mayHaveApplied(%v) = %v, want %v", name, tc.err, got, tc.want)
		}
	}
}
