# Tools are pinned Go modules in .ci/tools.mod, run with `go tool`.
BUF := go tool -modfile=.ci/tools.mod buf

.PHONY: run test check generate check-generate lint breaking bench

# The whole stack locally (see README).
run:
	go run ./deploy/devstack

# Every test: unit, Postgres integration, Rego, e2e, deploy checks.
test:
	go test -race ./...

# What CI runs besides the tests.
check: check-generate lint breaking

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

# The API must not break wire or source compatibility (buf.yaml breaking
# rules) against BREAKING_AGAINST: by default the commit before HEAD; on a
# branch, pass the main line, e.g. BREAKING_AGAINST='.git#branch=main'.
BREAKING_AGAINST ?= .git\#ref=HEAD~1
breaking:
	@if git rev-parse -q --verify 'HEAD~1^{commit}' >/dev/null; then \
		$(BUF) breaking --against '$(BREAKING_AGAINST)'; \
	else echo "breaking: no earlier commit to compare with"; fi

# Benchmarks quoted in issue notes.
bench:
	go test -run '^$$' -bench . -benchmem ./services/token/ ./services/opa/ ./services/authz/ ./gateways/budget/ ./gateways/usage/ ./gateways/internaltoken/ ./gateways/gateway/
