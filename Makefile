# Postroom: the two commands.
#   make run    set everything up and run every daemon on conf/dev.toml (loopback, high ports)
#   make test   set everything up and run the whole test suite
# Both bootstrap a fresh Debian machine as root: system packages, .venv, pip install.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
DEV_CONFIG  := conf/dev.toml
POSTROOM    := $(VENV)/bin/postroom --config $(DEV_CONFIG)
PYTEST_ARGS ?=

# Debian packages: what a venv needs, and what the tests drive as real peers and clients
# (libnet-ssleay-perl: swaks --tls, which the submission tests use; clamav-daemon: the
# clamd that tests/clamd_peer.py starts with its own config and one test signature).
APT_PACKAGES := python3 python3-venv python3-dev gcc ca-certificates swaks libnet-ssleay-perl isync fetchmail iproute2 \
                opendkim-tools clamav-daemon
# tests/test_import.py: a Maildir written by Dovecot's own imap process (tests/dovecot_peer.py);
# the dovecot service Debian starts with it is disabled below, as clamav's is.
APT_PACKAGES += dovecot-imapd
# tests/test_units.py: systemd-analyze verify and security read the unit files (no running
# systemd needed); a container's Debian may lack the package.
APT_PACKAGES += systemd
# The cluster's tests (issue 18): a throwaway etcd on loopback (tests/etcd_peer.py); the
# etcd service Debian enables with it is disabled below, as dovecot's is.
APT_PACKAGES += etcd-server etcd-client

.PHONY: run test test-long compliance install system-packages clean install-system

run: install
	@$(POSTROOM) domain list | grep -qx 'example.test' || $(POSTROOM) domain add example.test
	@if ! $(POSTROOM) user list example.test | cut -f1 | grep -qx 'demo@example.test'; then \
	    pw=$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(12))'); \
	    printf '%s\n' "$$pw" | $(POSTROOM) user add demo@example.test --password-stdin; \
	    (umask 077; printf '%s\n' "$$pw" > var/demo-password); \
	    echo "demo@example.test password: $$pw   (kept in var/demo-password)"; \
	else \
	    echo "demo@example.test password: $$(cat var/demo-password 2>/dev/null || echo 'see var/demo-password')"; \
	fi
	@if [ ! -d var/dkim/example.test ]; then \
	    $(POSTROOM) dkim keygen example.test --selector dev > var/dkim-example.test.txt && \
	    echo "DKIM key made for example.test; its TXT record is in var/dkim-example.test.txt"; \
	fi
	@echo "Connect with: swaks --server 127.0.0.1:2525 --to demo@example.test"
	@echo "              IMAP 127.0.0.1:2143 (STARTTLS) / 2993 (TLS), POP3 2110 / 2995,"
	@echo "              submission 2587 / 2465; user demo@example.test; certificate var/tls/cert.pem"
	@echo "Send out:     swaks --server 127.0.0.1:2587 --tls --auth-user demo@example.test \\"
	@echo "                --auth-password \$$(cat var/demo-password) --from demo@example.test --to someone@example.net"
	@echo "              (example.net is routed to 127.0.0.1:2600: start a receiver there, see conf/dev.toml)"
	@echo "Operations:   curl -s http://127.0.0.1:9154/metrics   (Prometheus, every daemon)"
	@echo "              $(POSTROOM) status --no-dns ; $(POSTROOM) reload"
	@echo "Anti-virus:   a clamd with one signature (the EICAR test file) on /tmp/postroom-dev-clamd.sock;"
	@echo "              README.md shows an EICAR message refused with swaks"
	@# The dev clamd ([clamav] in conf/dev.toml) lives as long as this recipe: Ctrl-C stops both.
	@rm -f /tmp/postroom-dev-clamd.sock
	$(PY) tests/clamd_peer.py unix:/tmp/postroom-dev-clamd.sock & clamd=$$!; \
	trap 'kill $$clamd 2>/dev/null' EXIT; \
	for i in $$(seq 300); do [ -S /tmp/postroom-dev-clamd.sock ] && break; sleep 0.1; done; \
	$(POSTROOM) serve

# The suite mostly waits (daemons starting, clients and servers talking, timeouts), so it
# runs in TEST_WORKERS processes at once; tests marked `serial` (timing that must not share
# the machine) run after, one at a time. Exit status 5 is pytest's "nothing selected", which
# PYTEST_ARGS="-k ..." makes likely in one of the two runs.
# Tests take from 0.01 s to a minute: with --dist worksteal a worker that runs out takes
# tests queued for another, rather than the run waiting on the one holding a long file.
# The suite starts some hundreds of `postroom` processes: where PYTHONDONTWRITEBYTECODE is
# set (this machine's environment sets it) none writes its .pyc, so each compiled our ~130
# modules again (~0.35 s of CPU a process); they are compiled once here instead, and a
# process reads a .pyc whatever that variable says (a stale one is recompiled, as ever).
# pytest's own cache of the test modules with their asserts rewritten follows the same
# variable: each pytest process (every xdist worker, then the serial run) rewrote all ~120
# test modules again, ~4.5 s of CPU each. One --collect-only with the variable unset writes
# that cache first (tests/__pycache__/*-pytest-*.pyc); the runs after it only read it.
# Four, on this 2-core machine: the workers wait on daemons and clients most of the time;
# three kept the CPU 147% busy and the parallel part took 414 s, four 151% and 362 s
# (2026-12-03). The suite's CPU (~660 s of user and system time) sets the floor, not this.
TEST_WORKERS ?= 4
WARM_PYTEST  := PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q --collect-only -p no:cacheprovider >/dev/null 2>&1 || true
SOURCE_DIRS  := postroom mtad imapd pop3d storage policy wire conf cluster tests

test: install
	@$(PY) -m compileall -q $(SOURCE_DIRS) >/dev/null
	@$(WARM_PYTEST)
	@$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not serial" $(PYTEST_ARGS); rc=$$?; [ $$rc = 0 ] || [ $$rc = 5 ] || exit $$rc
	@$(PY) -m pytest -m serial $(PYTEST_ARGS); rc=$$?; [ $$rc = 0 ] || [ $$rc = 5 ] || exit $$rc

# The tests marked `long` at their full counts (tests/scale.py): more fuzz examples, rounds,
# bytes than `make test` gives them (it runs the same tests with short counts). Minutes
# more; bench/fuzz.py fuzzes the protocol cores longer still.
test-long: install
	@$(PY) -m compileall -q $(SOURCE_DIRS) >/dev/null
	@$(WARM_PYTEST)
	@POSTROOM_TEST_LONG=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal -m "long and not serial" $(PYTEST_ARGS); rc=$$?; [ $$rc = 0 ] || [ $$rc = 5 ] || exit $$rc
	@POSTROOM_TEST_LONG=1 $(PY) -m pytest -m "long and serial" $(PYTEST_ARGS); rc=$$?; [ $$rc = 0 ] || [ $$rc = 5 ] || exit $$rc

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml | system-packages
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

# Installs only what is missing, so a prepared machine never waits on apt.
# clamav-daemon comes here as a test peer only: when this installs it, the services Debian
# enables with it are stopped and disabled again (freshclam would download ~200 MB of
# signatures, then Debian's clamd would hold ~1 GiB of them, on a machine running the
# suite). Nothing of Postroom's uses them; `systemctl enable --now clamav-freshclam
# clamav-daemon` brings them back for a real clamd.
CLAMAV_SERVICES := clamav-freshclam.service clamav-daemon.service clamav-daemon.socket

system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages (install as root): $$missing" >&2; exit 1; fi; \
	    echo "installing Debian packages: $$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing || exit 1; \
	    case " $$(echo $$missing) " in *" clamav-daemon "*) \
	        if [ -d /run/systemd/system ]; then \
	            echo "clamav-daemon is a test peer here: disabling $(CLAMAV_SERVICES)"; \
	            systemctl disable --now $(CLAMAV_SERVICES) || true; \
	        fi;; \
	    esac; \
	    case " $$(echo $$missing) " in *" dovecot-imapd "*) \
	        if [ -d /run/systemd/system ]; then systemctl disable --now dovecot.service dovecot.socket || true; fi;; \
	    esac; \
	    case " $$(echo $$missing) " in *" etcd-server "*) \
	        if [ -d /run/systemd/system ]; then systemctl disable --now etcd.service || true; fi;; \
	    esac; \
	fi

# Dovecot's imaptest (MIT), an IMAP conformance suite, built from the snapshot in
# ../shared/peers (see README for getting it elsewhere): its scripted test groups run against
# a `postroom serve` of its own on free loopback ports (tests/compliance.py). Building it
# needs Dovecot's library (dovecot-core); Debian's dovecot service it brings is disabled as
# clamav's is: it is a peer here, not a server. dovecot-imapd and dovecot-pop3d are the peer
# bench/imap.py and bench/pop3.py measure Postroom against (a throwaway config of their own).
PEERS          ?= ../shared/peers
IMAPTEST_DIR   := build/imaptest
COMPLIANCE_APT := dovecot-core dovecot-dev dovecot-imapd dovecot-pop3d autoconf automake libtool pkg-config gcc make

compliance: install
	@missing=$$(for p in $(COMPLIANCE_APT); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages: $$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing || exit 1; \
	    if [ -d /run/systemd/system ]; then systemctl disable --now dovecot.service dovecot.socket || true; fi; \
	fi
	@if [ ! -x $(IMAPTEST_DIR)/bin/imaptest ]; then \
	    if [ ! -x $(PEERS)/build-imaptest.sh ]; then \
	        echo "no $(PEERS)/build-imaptest.sh: build imaptest yourself into $(IMAPTEST_DIR) (README)" >&2; exit 1; \
	    fi; \
	    $(PEERS)/build-imaptest.sh $(IMAPTEST_DIR); \
	fi
	$(PY) tests/compliance.py $(IMAPTEST_DIR)

# The peers the benchmarks in bench/ measure against and the tools they use: Postfix
# (bench/smtp_in.py --compare-postfix, bench/smtp_out.py: a throwaway instance of its own
# each; Debian's postfix service is disabled, as dovecot's is) and its smtp-source, strace
# (bench/flushes.py), Dovecot (bench/imap.py, bench/pop3.py).
# Postfix's checks for `bench/smtp_in.py --compare-postfix --policy` (bench/postfix_checks.py)
BENCH_APT := postfix strace dovecot-imapd dovecot-pop3d opendkim opendmarc clamav-milter \
              postfix-policyd-spf-python unbound

.PHONY: bench-peers
bench-peers: install
	@missing=$$(for p in $(BENCH_APT); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages: $$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing || exit 1; \
	    if [ -d /run/systemd/system ]; then \
	        systemctl disable --now postfix.service dovecot.service dovecot.socket opendkim.service \
		    opendmarc.service unbound.service unbound-resolvconf.service || true; \
	    fi; \
	fi

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# docs/config.md from conf/schema.py and the comments of conf/postroom.toml
# (postroom/configref.py); tests/test_config_reference.py fails when it is stale.
.PHONY: config-doc
config-doc: install
	$(VENV)/bin/postroom config reference > docs/config.md.new && mv docs/config.md.new docs/config.md

# The install check: docs/ followed as a newcomer would on this machine, as root: install.md
# (make install-system, configure, start under the unit), a certificate renewal and reload
# (tls.md), a Maildir import (migration.md), a metrics scrape (metrics.md), a backup and a
# restore (backups.md). It installs Postroom for real (/opt/postroom, /etc/postroom,
# /var/lib/postroom, production ports), removing an earlier run's install first, and stops
# it at the end. Not part of `make test`: minutes, and the machine's own paths and ports.
.PHONY: install-check
install-check: install
	$(PY) tests/install_check.py

# A production install on Debian (docs/install.md), as root: a venv of its own in
# /opt/postroom (not the checkout's editable .venv: the source dir may go once installed),
# the commands linked into /usr/local/bin (where the units look for them), the `postroom`
# user that the units run as, its data dir, /etc/postroom with the example config when it
# has none (an existing one is never touched), and the units. Rerunning it is the upgrade:
# the venv is reinstalled from this checkout, and a running Postroom is restarted on the new
# code (its children are started from the files on disk: an old serve with new children
# would mix two versions). The units are enabled, not started: configure first.
INSTALL_PREFIX  ?= /opt/postroom
INSTALL_BIN     ?= /usr/local/bin
INSTALL_ETC     ?= /etc/postroom
INSTALL_UNITS   ?= /etc/systemd/system
INSTALL_DATA    ?= /var/lib/postroom
INSTALL_APT     := python3 python3-venv ca-certificates
# Debian's interpreter, not whichever python3 is first on root's PATH (a pyenv one lives
# under /root, which ProtectHome= hides from the units).
INSTALL_PYTHON  ?= /usr/bin/python3

install-system:
	@[ "$$(id -u)" = 0 ] || { echo "make install-system: run it as root" >&2; exit 1; }
	@missing=$$(for p in $(INSTALL_APT); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing || exit 1; \
	fi
	@# The venv is made again when its interpreter is not INSTALL_PYTHON (Debian moved to a new
	@# Python, or a first install with another one): its packages are built for that one only.
	@same=$$($(INSTALL_PREFIX)/bin/python -c 'import sys; print(sys.version)' 2>/dev/null); \
	if [ "$$same" != "$$($(INSTALL_PYTHON) -c 'import sys; print(sys.version)')" ]; then \
	    echo "$(INSTALL_PYTHON) -m venv --clear $(INSTALL_PREFIX)"; $(INSTALL_PYTHON) -m venv --clear $(INSTALL_PREFIX); \
	fi
	$(INSTALL_PREFIX)/bin/pip install --quiet --upgrade pip
	$(INSTALL_PREFIX)/bin/pip install --quiet .
	for c in postroom mtad imapd pop3d; do ln -sfn $(INSTALL_PREFIX)/bin/$$c $(INSTALL_BIN)/$$c; done
	getent group postroom >/dev/null || groupadd --system postroom
	getent passwd postroom >/dev/null || useradd --system --gid postroom --home-dir $(INSTALL_DATA) \
	    --no-create-home --shell /usr/sbin/nologin --comment "Postroom mail server" postroom
	install -d -o postroom -g postroom -m 0750 $(INSTALL_DATA)
	install -d -m 0755 $(INSTALL_ETC)
	install -d -g postroom -m 0750 $(INSTALL_ETC)/tls
	[ -e $(INSTALL_ETC)/postroom.toml ] || install -g postroom -m 0640 conf/postroom.toml $(INSTALL_ETC)/postroom.toml
	install -d $(INSTALL_UNITS)
	install -m 0644 systemd/*.service systemd/*.target $(INSTALL_UNITS)/
	@if [ -d /run/systemd/system ]; then \
	    systemctl daemon-reload && systemctl enable postroom.service && \
	    systemctl try-restart postroom.service postroom-mtad.service postroom-imapd.service postroom-pop3d.service; \
	else \
	    echo "systemd is not running here: units copied to $(INSTALL_UNITS), not enabled"; \
	fi
	@echo "Installed $$($(INSTALL_PREFIX)/bin/postroom --version) in $(INSTALL_PREFIX). Config: $(INSTALL_ETC)/postroom.toml"
