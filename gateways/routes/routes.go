// Package routes holds the built-in route tables of the gateways, as YAML
// data embedded in the binaries.
package routes

import (
	"embed"
	"fmt"

	"sigs.k8s.io/yaml"

	"github.com/cloud-connector/cloud-connector/gateways/route"
)

//go:embed *.yaml
var files embed.FS

// Default returns the built-in table of the named gateway ("ai", "cicd").
func Default(gateway string) (route.Table, error) {
	b, err := files.ReadFile(gateway + ".yaml")
	if err != nil {
		return route.Table{}, fmt.Errorf("no built-in routes for gateway %q", gateway)
	}
	var t route.Table
	if err := yaml.UnmarshalStrict(b, &t); err != nil {
		return route.Table{}, fmt.Errorf("built-in routes %s: %w", gateway, err)
	}
	return t, nil
}
