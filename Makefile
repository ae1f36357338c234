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
# benchmarks and compatibility tests run the socat original side by side.
system-deps:
	@missing=""; \
	pkg-config --exists libsystemd 2>/dev/null || missing="libsystemd-dev pkg-config"; \
	command -v socat >/dev/null 2>&1 || missing="$$missing socat"; \
	command -v systemd-socket-activate >/dev/null 2>&1 || missing="$$missing systemd"; \
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

# Native packages into dist/, each built from a copy of the tree
# (packaging/build.sh): `make deb` needs Debian's dpkg-dev, debhelper,
# dh-python, python3-trio and python3-systemd; `make rpm` needs rpm
# (rpmbuild) and cpio. The .deb is for templates and app qubes; the RPMs
# are the Fedora template package and qconnect-dom0 (qconnect policy).
.PHONY: deb rpm
deb:
	packaging/build.sh deb dist

rpm:
	packaging/build.sh rpm dist

# The trio-using tests under Debian's own /usr/bin/python3 with Debian's
# python3-trio (0.22 on Debian 12), python3-systemd, python3-pytest and
# python3-hypothesis. Debian 12 has no python3-pytest-trio: the plugin (pure
# Python) is borrowed from the venv, alone, from a temporary directory.
.PHONY: debian-python-test
debian-python-test: setup
	@plugin=$$(mktemp -d) && trap 'rm -rf "$$plugin"' EXIT && \
	cp -r $$($(BIN)/python -c 'import os, pytest_trio; print(os.path.dirname(pytest_trio.__file__))') "$$plugin"/ && \
	PYTHONPATH="$(CURDIR):$$plugin" /usr/bin/python3 -m pytest -q -p no:cacheprovider -p pytest_trio.plugin \
	  $$(grep -l trio tests/test_*.py)

# Install the .deb with apt into freshly bootstrapped Debian 12 and 13 trees,
# beside a stand-in for Qubes' qubes-core-agent-networking (root, debootstrap,
# network; base trees cached in /var/tmp/qconnect-package-test).
.PHONY: package-install-test
package-install-test:
	@out=$$(mktemp -d) && trap 'rm -rf "$$out"' EXIT && \
	packaging/build.sh deb "$$out" >/dev/null && \
	for suite in bookworm trixie; do packaging/apt-install-test.sh $$suite "$$out"/qconnect_*_all.deb || exit 1; done

# Under a live systemd: boot Debian 12 under qemu (KVM when it works, else
# emulation; no network) with the .deb, persist bindings, enable the socket
# service, reboot, and check them at boot, in the journal and in systemctl
# status, then that `persist remove` leaves the system as before
# (packaging/qemu-test.sh; root; a few minutes; not part of `make test`).
.PHONY: package-test
package-test: package-install-test
	@out=$$(mktemp -d) && trap 'rm -rf "$$out"' EXIT && \
	packaging/build.sh deb "$$out" >/dev/null && \
	packaging/qemu-test.sh "$$out"/qconnect_*_all.deb
