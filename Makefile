# qconnect: every target sets up what it needs on a fresh machine
# (python3, pip, make and apt are all it assumes).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT_PACKAGES := libsystemd-dev pkg-config socat

.PHONY: all setup system-deps test lint typecheck pytest demo bench soak clean

all: test

# System packages: systemd-python compiles against libsystemd's headers, and the
# benchmarks and compatibility tests run the socat original side by side; the
# qconnect expose tests build network namespaces (iproute2), a firewall
# (nftables) and check the PROXY header with a real nginx.
system-deps:
	@missing=""; \
	pkg-config --exists libsystemd 2>/dev/null || missing="libsystemd-dev pkg-config"; \
	command -v socat >/dev/null 2>&1 || missing="$$missing socat"; \
	command -v systemd-socket-activate >/dev/null 2>&1 || missing="$$missing systemd"; \
	PATH="$$PATH:/usr/sbin:/sbin"; \
	command -v nginx >/dev/null 2>&1 || missing="$$missing nginx"; \
	command -v nft >/dev/null 2>&1 || missing="$$missing nftables"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null; \
	  else \
	    echo "missing system packages; run: sudo apt-get install -y $$missing" >&2; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check qconnect tests bench

typecheck: setup
	$(BIN)/mypy qconnect

pytest: setup
	$(BIN)/pytest -q

test: lint typecheck pytest

demo: setup
	$(BIN)/qconnect demo

bench: setup
	$(BIN)/python -m bench

soak: setup
	$(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
