# qconnect: every target sets up what it needs on a fresh machine
# (python3, pip, make, git and, as root, apt are all it assumes).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Written last, once every step below has succeeded: a .venv without it is
# half-made (an interrupted run) and the next run repairs it.
STAMP  := $(VENV)/.qconnect-installed

.PHONY: all setup system-deps test lint typecheck pytest demo bench soak clean

all: test

# System packages (Debian names): the venv needs ensurepip (pythonX.Y-venv);
# systemd-python compiles against Python's and libsystemd's headers; the
# tests and benchmarks run socat and systemd's tools (systemd-analyze,
# systemd-socket-activate). As root they are installed; otherwise the missing
# ones are named with the command that installs them, on one line.
# The qconnect expose tests build network namespaces (iproute2), a firewall
# (nftables) and check the PROXY header with a real nginx; the package tests
# build the .deb and the RPMs (dpkg-dev, debhelper, dh-python, lintian, rpm,
# rpm2cpio, cpio, mandoc) and run the unpacked .deb on Debian's own python3
# with Debian's python3-trio and python3-systemd.
system-deps:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "qconnect needs Python 3.11 or later; $(PYTHON) is: $$($(PYTHON) --version 2>&1)" >&2; \
	  exit 1; }
	@py=python$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	missing=""; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing $$py-venv"; \
	$(PYTHON) -c 'import os, sys, sysconfig; \
	  sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	  || missing="$$missing $$py-dev"; \
	command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || missing="$$missing gcc"; \
	command -v pkg-config >/dev/null 2>&1 || missing="$$missing pkg-config"; \
	pkg-config --exists libsystemd 2>/dev/null || missing="$$missing libsystemd-dev"; \
	command -v socat >/dev/null 2>&1 || missing="$$missing socat"; \
	command -v systemd-socket-activate >/dev/null 2>&1 || missing="$$missing systemd"; \
	PATH="$$PATH:/usr/sbin:/sbin"; \
	command -v nginx >/dev/null 2>&1 || missing="$$missing nginx"; \
	command -v nft >/dev/null 2>&1 || missing="$$missing nftables"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v dpkg-buildpackage >/dev/null 2>&1 || missing="$$missing dpkg-dev"; \
	command -v dh >/dev/null 2>&1 || missing="$$missing debhelper"; \
	command -v dh_python3 >/dev/null 2>&1 || missing="$$missing dh-python"; \
	command -v lintian >/dev/null 2>&1 || missing="$$missing lintian"; \
	command -v rpmbuild >/dev/null 2>&1 || missing="$$missing rpm"; \
	command -v rpm2cpio >/dev/null 2>&1 || missing="$$missing rpm2cpio"; \
	command -v cpio >/dev/null 2>&1 || missing="$$missing cpio"; \
	command -v mandoc >/dev/null 2>&1 || missing="$$missing mandoc"; \
	/usr/bin/python3 -c 'import trio' 2>/dev/null || missing="$$missing python3-trio"; \
	/usr/bin/python3 -c 'import systemd.journal' 2>/dev/null || missing="$$missing python3-systemd"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "missing system packages:$$missing; run: sudo apt-get install -y$$missing" >&2; \
	  exit 1; \
	fi; \
	echo "installing system packages:$$missing"; \
	export DEBIAN_FRONTEND=noninteractive; \
	{ dpkg --configure -a && apt-get update -qq && \
	  apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } || { \
	  echo "could not install:$$missing (apt-get failed; see above)" >&2; exit 1; }

# The venv is trusted only when its stamp is there and its python runs;
# otherwise it is checked step by step, and remade when its pip does not run.
$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	@rm -f $@
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || { \
	  echo "creating $(VENV) with $(PYTHON)"; rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	@echo "installing qconnect and its Python dependencies into $(VENV) (log: $(VENV)/pip.log)"
	@{ $(BIN)/python -m pip install --upgrade pip && \
	   $(BIN)/python -m pip install -e '.[test]'; } >$(VENV)/pip.log 2>&1 || { \
	  tail -n 30 $(VENV)/pip.log >&2; echo "pip install failed; the whole log: $(VENV)/pip.log" >&2; \
	  exit 1; }
	@touch $@

setup:
	@$(BIN)/python -c 'import qconnect' >/dev/null 2>&1 || rm -f $(STAMP)
	@$(MAKE) --no-print-directory --silent $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check qconnect tests bench

typecheck: setup
	$(BIN)/mypy qconnect

# Test processes: the suite mostly waits on subprocesses and sockets, so more
# workers than cores still shorten it (measured one after the other on this
# 2-core machine while others loaded it: one process 185 s, 2 workers 169 s,
# 4 workers 113 s). PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 4

pytest: setup
	$(BIN)/pytest -q -n $(PYTEST_WORKERS)

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
