package policies_test

import (
	"context"
	"testing"

	"github.com/cloud-connector/cloud-connector/policies"
	"github.com/cloud-connector/cloud-connector/services/opa"
)

// TestRego runs every *_test.rego test beside the policy through OPA's
// tester, one Go subtest per Rego test.
func TestRego(t *testing.T) {
	t.Parallel()
	results, err := opa.Test(context.Background(), policies.FS())
	if err != nil {
		t.Fatal(err)
	}
	if len(results) < 10 {
		t.Fatalf("only %d Rego tests found", len(results))
	}
	for _, r := range results {
		t.Run(r.Name, func(t *testing.T) {
			if r.Error != nil {
				t.Fatalf("%s: error: %v", r.Location, r.Error)
			}
			if r.Fail {
				t.Fatalf("%s: failed", r.Location)
			}
		})
	}
}
