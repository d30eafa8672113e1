# bmig: the two commands of the quick start are `make test` and `make demo`.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Debian packages the test suite drives (real clients and tools, not mocks).
DEB_PACKAGES := procps util-linux qemu-utils libnbd-bin nbdkit fio fuse3 e2fsprogs openssh-server openssh-client \
                user-mode-linux kmod nbd-client thin-provisioning-tools dmsetup systemd \
                resource-agents libxml2-utils pacemaker-cli-utils

PYTEST_ARGS ?=

.PHONY: test venv deb-deps demo bench clean

test: venv deb-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# Install missing Debian packages when running as root; otherwise say what is missing.
deb-deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ]; then \
	        echo "installing Debian packages:$$missing"; \
	        DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	    else \
	        echo "missing Debian packages (run as root to install):$$missing" >&2; \
	    fi; \
	fi

# A live migration on this machine (bmig/demo/); e2fsprogs makes its ext4 image.
DEMO_PACKAGES := e2fsprogs

demo: venv
	@$(MAKE) --no-print-directory deb-deps DEB_PACKAGES='$(DEMO_PACKAGES)'
	$(BIN)/python -m bmig.demo

bench: venv
	$(BIN)/python bench/breqd.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

# -- make install: the commands, man pages, units, example configs, shell completion --
# PREFIX is /usr/local unless given; DESTDIR stages the tree for a package (any user may
# do that). The commands run in a virtual environment of their own under LIBDIR, made
# with the system's Python so that every user and every unit can run them; it gets the
# Python packages bmig needs from the package index.
PREFIX         ?= /usr/local
BINDIR         ?= $(PREFIX)/bin
LIBDIR         ?= $(PREFIX)/lib/bmig
MANDIR         ?= $(PREFIX)/share/man
DOCDIR         ?= $(PREFIX)/share/doc/bmig
UNITDIR        ?= $(PREFIX)/lib/systemd/system
BASHCOMPDIR    ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR     ?= $(PREFIX)/share/zsh/site-functions
INSTALL_PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)
# The [project.scripts] of pyproject.toml (tests/docs/test_install.py checks).
COMMANDS       := bmigrate breqd bmig-nbd breceive bmig-dm
UNITS          := $(wildcard systemd/*.service systemd/*.socket systemd/*.timer systemd/*.target)
# What make install needs from Debian: Python 3.11 or later with venv.
INSTALL_PACKAGES := python3 python3-venv
# The tests lint the pages (mandoc), read them (man), verify the units (systemd-analyze)
# and load the completions (bash-completion, zsh).
DEB_PACKAGES += mandoc man-db systemd bash-completion zsh $(INSTALL_PACKAGES)

VENV_DIR := $(DESTDIR)$(LIBDIR)

.PHONY: install uninstall

install:
	@$(MAKE) --no-print-directory deb-deps DEB_PACKAGES='$(INSTALL_PACKAGES)'
	@$(INSTALL_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	    { echo "make install: $(INSTALL_PYTHON) is not Python 3.11 or later (set INSTALL_PYTHON)" >&2; exit 1; }
	@# setuptools would pack what an older tree left in build/ into the wheel.
	rm -rf build
	$(INSTALL_PYTHON) -m venv $(VENV_DIR)
	$(VENV_DIR)/bin/python -m pip install --quiet --no-compile --root-user-action=ignore \
	    --disable-pip-version-check .
	@# The environment names where it will live, not where it was staged.
	if [ -n "$(DESTDIR)" ]; then \
	    grep -rlIF -- '$(VENV_DIR)' $(VENV_DIR) | xargs -r sed -i 's|$(VENV_DIR)|$(LIBDIR)|g'; \
	fi
	$(VENV_DIR)/bin/python -m compileall -q -f -j 0 -d $(LIBDIR)/lib $(VENV_DIR)/lib
	install -d $(DESTDIR)$(BINDIR)
	for c in $(COMMANDS); do ln -sfr $(VENV_DIR)/bin/$$c $(DESTDIR)$(BINDIR)/$$c; done
	install -d $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8
	install -m 644 man/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -m 644 man/*.5 $(DESTDIR)$(MANDIR)/man5/
	install -m 644 man/*.8 $(DESTDIR)$(MANDIR)/man8/
	@# The units run the commands from BINDIR.
	install -d $(DESTDIR)$(UNITDIR)
	for u in $(UNITS); do \
	    sed 's|/usr/local/bin/|$(BINDIR)/|g' $$u > $(DESTDIR)$(UNITDIR)/$${u##*/} && \
	    chmod 644 $(DESTDIR)$(UNITDIR)/$${u##*/} || exit 1; \
	done
	install -d $(DESTDIR)$(DOCDIR)/examples
	install -m 644 README.md docs/*.md $(DESTDIR)$(DOCDIR)/
	install -m 644 daemons/examples/*.toml $(DESTDIR)$(DOCDIR)/examples/
	@# Completion written from the commands just installed, with device names from breqd.
	install -d $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR)
	$(VENV_DIR)/bin/python completion/generate.py bash $(DESTDIR)$(BASHCOMPDIR)/bmigrate
	for c in $(filter-out bmigrate,$(COMMANDS)); do ln -sf bmigrate $(DESTDIR)$(BASHCOMPDIR)/$$c; done
	$(VENV_DIR)/bin/python completion/generate.py zsh $(DESTDIR)$(ZSHCOMPDIR)/_bmigrate
	@if [ -z "$(DESTDIR)" ]; then \
	    echo "bmig is installed in $(PREFIX); its units are in $(UNITDIR):"; \
	    echo "'systemctl daemon-reload' makes systemd see them (see README.md, Installation)"; \
	fi

uninstall:
	rm -f $(addprefix $(DESTDIR)$(BINDIR)/,$(COMMANDS))
	rm -rf $(DESTDIR)$(LIBDIR) $(DESTDIR)$(DOCDIR)
	rm -f $(addprefix $(DESTDIR)$(MANDIR)/man1/,$(notdir $(wildcard man/*.1))) \
	      $(addprefix $(DESTDIR)$(MANDIR)/man5/,$(notdir $(wildcard man/*.5))) \
	      $(addprefix $(DESTDIR)$(MANDIR)/man8/,$(notdir $(wildcard man/*.8)))
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(notdir $(UNITS)))
	rm -f $(addprefix $(DESTDIR)$(BASHCOMPDIR)/,$(COMMANDS)) $(DESTDIR)$(ZSHCOMPDIR)/_bmigrate
