// Package policies holds the authorization policy (Rego, with its tests
// beside it) and the data it decides with: unit primitives, plans, budgets,
// overrides and pressure-relief switches. The files are embedded so the
// decision service ships them; a directory can override them at run time.
package policies

import (
	"embed"
	"io/fs"
)

//go:embed *.rego */data.yaml
var files embed.FS

// FS returns the embedded policy bundle.
func FS() fs.FS { return files }

// Query is the rule the decision service evaluates.
const Query = "data.cloudconnector.authz.decision"
