// Package routes holds the built-in route tables of the gateways, as YAML
// data embedded in the binaries.
package routes

import (
	"embed"
	"fmt"

	"github.com/cloud-connector/cloud-connector/gateways/route"
	"github.com/cloud-connector/cloud-connector/services/config"
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
	if err := config.Parse("built-in routes "+gateway, b, &t); err != nil {
		return route.Table{}, err
	}
	return t, nil
}
