# Tools are pinned Go modules in .ci/tools.mod, run with `go tool`.
BUF := go tool -modfile=.ci/tools.mod buf

.PHONY: run test check generate check-generate lint bench

# The whole stack locally (see README).
run:
	go run ./deploy/devstack

# Every test: unit, Postgres integration, Rego, e2e, deploy checks.
test:
	go test -race ./...

# What CI runs besides the tests.
check: check-generate lint

generate:
	$(BUF) generate --template proto/buf.gen.yaml

lint:
	$(BUF) lint
	$(BUF) format --diff --exit-code
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	go vet ./...

# Fails when the committed generated code differs from what buf produces.
check-generate: generate
	@git diff --exit-code -- proto/gen || { echo "generated code is stale: run make generate and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- proto/gen)" || { git status --porcelain -- proto/gen; echo "untracked generated files: run make generate and commit"; exit 1; }

# Benchmarks quoted in issue notes.
bench:
	go test -run '^$$' -bench . -benchmem ./services/token/ ./services/opa/ ./services/authz/ ./gateways/budget/ ./gateways/usage/ ./gateways/gateway/
