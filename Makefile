SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
NODE_BIN := $(CURDIR)/node_modules/.bin
# The venv's and node_modules' tools come first, so buf finds its local plugins.
export PATH := $(BIN):$(NODE_BIN):$(PATH)
# buf keeps a cache; keep it inside the checkout so a read-only HOME is fine.
export BUF_CACHE_DIR ?= $(CURDIR)/.build/buf-cache
# The previous commit is the baseline `buf breaking` guards against.
BREAKING_AGAINST ?= .git\#ref=HEAD~1
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: help
help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | sort | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench,cloud]'
	@touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-fund --no-audit --loglevel=error
	@touch $@

.PHONY: install
install: $(VENV)/.installed node_modules/.installed ## Create the venv and install Python and Node dependencies

.PHONY: gen
gen: install ## Regenerate gen/ (Python + TypeScript) from proto/
	buf generate 2> >(grep -v '^Writing mypy to' >&2)
	touch gen/python/tickmesh/v1/py.typed gen/python/tickmesh/internal/v1/py.typed

.PHONY: check-gen
check-gen: gen ## Fail if regenerating changes gen/
	@if [ -n "$$(git status --porcelain -- gen/)" ]; then \
	  git status --porcelain -- gen/; git --no-pager diff --stat -- gen/; \
	  echo "gen/ is out of date with proto/: run 'make gen' and commit the result" >&2; exit 1; \
	fi
	@echo "gen/ matches proto/"

.PHONY: vectors
vectors: install ## Rewrite the golden vectors (only when the contract deliberately changes)
	python -m tests.vectors.build

.PHONY: breaking
breaking: install ## buf breaking against the previous commit
	@if git rev-parse -q --verify 'HEAD~1^{commit}' >/dev/null && git cat-file -e HEAD~1:proto 2>/dev/null; then \
	  buf breaking --against '$(BREAKING_AGAINST)' && echo "buf breaking: no breaking change against HEAD~1"; \
	else \
	  echo "buf breaking: HEAD~1 has no proto/ (first contract commit or shallow clone); nothing to compare"; \
	fi

.PHONY: lint
lint: install ## ruff, ruff format, buf lint, buf format
	ruff check .
	ruff format --check .
	buf lint
	buf format -d --exit-code

.PHONY: fmt
fmt: install ## Format Python and protos in place
	ruff check --fix .
	ruff format .
	buf format -w

.PHONY: typecheck
typecheck: install ## mypy --strict on hand-written code
	mypy

.PHONY: test-unit
test-unit: install ## Unit and contract tests (no sockets)
	pytest tests/unit tests/contract tests/vectors $(PYTEST_ARGS)

.PHONY: test-integration
test-integration: install ## Integration tests against real servers
	pytest tests/integration $(PYTEST_ARGS)

.PHONY: test-e2e
test-e2e: install browser ## End-to-end tests of the whole mesh
	pytest tests/e2e $(PYTEST_ARGS)

.PHONY: chaos
chaos: install ## The whole reliability suite (tests/chaos, RELIABILITY.md §4.2), with its summary table
	pytest tests/chaos -m chaos -p no:cacheprovider $(PYTEST_ARGS)

.PHONY: test-py
test-py: install browser ## Every Python test
	pytest $(PYTEST_ARGS)

.PHONY: test-node
test-node: install ## TypeScript build and Node tests (golden vectors)
	npm test --silent

.PHONY: conformance
conformance: install ## Run the executor conformance kit against the Python and TypeScript workers
	npm run build --silent
	python -m tests.conformance.check -- python -m tests.conformance.executors.python_executor
	python -m tests.conformance.check -- node sdk/typescript/dist/sdk/typescript/examples/conformance.js

.PHONY: servers
servers: ## Install PostgreSQL, redis-server and chromium (apt-get) if missing; the tests start throwaway servers
	bash .ci/ensure-servers

.PHONY: browser
browser: ## Install Debian's chromium (apt-get) if missing, for the console's browser test
	@test -x /usr/bin/chromium || bash .ci/ensure-servers

.PHONY: test
test: lint typecheck check-gen breaking test-node test-py ## Everything CI runs

.PHONY: check
check: test ## Alias of test

.PHONY: demo
demo: install ## Run the coding-agent example end to end on an embedded mesh
	tickmesh run examples/coding_agent/graph.yaml \
	  --input '{"task": "an adder library", "modules": ["parser", "lexer", "emitter"]}'

.PHONY: demo-ts
demo-ts: install ## The demo with validate_code served by the TypeScript executor (Node)
	npm run build --silent
	tickmesh run examples/coding_agent/graph.yaml \
	  --executor "validate_code=node sdk/typescript/dist/examples/coding_agent/ts/validate.js" \
	  --input '{"task": "an adder library", "modules": ["parser", "lexer", "emitter"]}'

.PHONY: bench
bench: install ## Run the benchmark for both profiles and print its figures (BENCH_ARGS="--profile cloud"), then 10,000 parked lifetimes
	$(BIN)/python -m bench $(BENCH_ARGS)
	$(BIN)/python -m bench.parked $(PARKED_ARGS)

.PHONY: clean
clean: ## Remove build outputs and caches (keeps the venv)
	rm -rf .build .pytest_cache .mypy_cache .ruff_cache
