# bmig: the two commands of the quick start are `make test` and `make demo`.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Debian packages the test suite drives (real clients and tools, not mocks).
DEB_PACKAGES := procps util-linux qemu-utils libnbd-bin nbdkit fio fuse3 e2fsprogs openssh-server openssh-client \
                user-mode-linux kmod nbd-client thin-provisioning-tools dmsetup \
                resource-agents libxml2-utils

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
