# Tools are pinned Go modules in .ci/tools.mod, run with `go tool`.
BUF := go tool -modfile=.ci/tools.mod buf

.PHONY: run test generate check-generate lint

run:
	go run ./deploy/devstack

test:
	go test -race ./...

generate:
	$(BUF) generate --template proto/buf.gen.yaml

lint:
	$(BUF) lint
	$(BUF) format --diff --exit-code
	go vet ./...

# Fails when the committed generated code differs from what buf produces.
check-generate: generate
	@git diff --exit-code -- proto/gen || { echo "generated code is stale: run make generate and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- proto/gen)" || { git status --porcelain -- proto/gen; echo "untracked generated files: run make generate and commit"; exit 1; }
