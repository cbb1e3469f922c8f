package routes_test

import (
	"testing"

	"github.com/cloud-connector/cloud-connector/gateways/route"
	"github.com/cloud-connector/cloud-connector/gateways/routes"
)

func TestDefaultTablesValidate(t *testing.T) {
	t.Parallel()
	backends := map[string]map[string]route.Backend{
		"ai": {
			"ai_gateway":   {URL: "http://ai-gateway:5052", Audience: "gitlab-ai-gateway"},
			"duo_workflow": {URL: "http://duo-workflow:50052", Audience: "gitlab-duo-workflow-service", HTTP2: true},
		},
		"cicd": {"cicd_service": {URL: "http://cicd:8080", Audience: "gitlab-cicd"}},
	}
	for name, b := range backends {
		tbl, err := routes.Default(name)
		if err != nil {
			t.Fatal(err)
		}
		if err := tbl.Validate(b); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := routes.Default("nope"); err == nil {
		t.Error("unknown gateway has routes")
	}
}
