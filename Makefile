# dcn-node: two set-up commands, `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CONFIG ?= dcn_node/dcn-node.yaml
# CPU build of torch; see README "GPU install" for CUDA machines.
TORCH_SPEC ?= torch==2.13.0
# Debian packages the test suite talks to as real peers.
TEST_DEBS := dcmtk dicom3tools orthanc orthanc-gdcm orthanc-dicomweb prometheus chromium nodejs npm \
             postgresql faketime haproxy rabbitmq-server
# The radiologist's viewer in tests: OHIF's prebuilt app and the browser driver, pinned
# (also in tests/ohif.py), into a cache folder outside the checkout.
OHIF_VERSION      ?= 3.13.2
PUPPETEER_VERSION ?= 25.16.0
OHIF_DIR          ?= $(HOME)/.cache/dcn-node/ohif

# install-systemd: where the checkout (with its .venv) lives, and where units go.
INSTALL_DIR ?= /opt/dcn-node
SYSTEMD_DIR ?= /etc/systemd/system

.PHONY: run test venv test-deps system-deps ohif-deps lint bench bench-robustness audit \
        clean install-systemd

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -c constraints.txt -e ".[test,cluster]"
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/dcn-node serve --config $(CONFIG)

# Installs the Debian peers when they are missing and we are root; otherwise says what is missing.
system-deps:
	@missing=""; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v Orthanc  >/dev/null || missing="$$missing orthanc"; \
	test -e /usr/share/orthanc/plugins/libOrthancGdcm.so || missing="$$missing orthanc-gdcm"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v faketime >/dev/null || missing="$$missing faketime"; \
	test -x /usr/sbin/haproxy || command -v haproxy >/dev/null || missing="$$missing haproxy"; \
	test -x /usr/lib/rabbitmq/bin/rabbitmq-server || missing="$$missing rabbitmq-server"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (run as root or install them)"; exit 1; fi; \
	fi

# OHIF's dist (npm pack of @ohif/app: the prebuilt app, no build) and puppeteer-core.
ohif-deps: system-deps
	@if [ ! -f "$(OHIF_DIR)/ohif-app-$(OHIF_VERSION)/dist/index.html" ]; then \
	  mkdir -p "$(OHIF_DIR)" && cd "$(OHIF_DIR)" && \
	  npm pack --silent "@ohif/app@$(OHIF_VERSION)" >/dev/null && \
	  rm -rf package "ohif-app-$(OHIF_VERSION)" && tar xzf "ohif-app-$(OHIF_VERSION).tgz" && \
	  mv package "ohif-app-$(OHIF_VERSION)" && rm "ohif-app-$(OHIF_VERSION).tgz"; \
	fi
	@if [ ! -d "$(OHIF_DIR)/node_modules/puppeteer-core" ]; then \
	  cd "$(OHIF_DIR)" && { [ -f package.json ] || echo '{"private": true}' > package.json; } && \
	  npm install --silent --no-audit --no-fund "puppeteer-core@$(PUPPETEER_VERSION)"; \
	fi

test-deps: venv system-deps ohif-deps

test: test-deps
	OHIF_DIR="$(OHIF_DIR)" $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Known vulnerabilities in the installed dependencies (PyPI's advisory data). Strict: a
# package the index cannot vouch for fails the target, so an index without advisory data
# (a mirror without PyPI's JSON API, as on the build machines here) fails loudly instead of
# passing having audited nothing. Not part of `make test` for that reason; run it where
# PyPI is reachable.
audit: venv
	$(VENV)/bin/pip-audit --progress-spinner off --skip-editable --strict

# The same checks as tests/test_lint.py (part of make test); mypy's files: pyproject.toml.
lint: venv
	$(VENV)/bin/ruff check dcn_node dcn_train tests bench
	$(VENV)/bin/mypy

bench: venv
	$(PY) bench/ingest.py
	$(PY) bench/memory.py

# The long robustness runs (docs/robustness.md): kill -9 rounds (one node; a cluster's
# receivers and workers), load, fuzzing.
bench-robustness: venv
	$(PY) bench/faults.py --rounds 20
	$(PY) bench/failover.py --rounds 20
	$(PY) bench/load.py
	$(PY) bench/fuzz.py --seconds 600

# The systemd service (docs/operations.md#systemd), as root, for a checkout at INSTALL_DIR
# whose .venv exists (`make venv` there): user dcn-node, /etc/dcn-node/dcn-node.yaml (kept
# when present), the unit with INSTALL_DIR in its paths, daemon-reload; the cluster roles'
# units too (docs/operations.md#cluster-roles). Does not start or enable any.
install-systemd:
	@test "$$(id -u)" = 0 || { echo "run as root: sudo make install-systemd"; exit 1; }
	@test -x "$(INSTALL_DIR)/.venv/bin/dcn-node" || { echo "$(INSTALL_DIR)/.venv/bin/dcn-node \
	  missing: put the checkout at INSTALL_DIR and run make venv there"; exit 1; }
	getent passwd dcn-node >/dev/null || useradd --system --user-group --no-create-home \
	  --home-dir /var/lib/dcn-node --shell /usr/sbin/nologin dcn-node
	install -d -m 0750 -o root -g dcn-node /etc/dcn-node
	test -e /etc/dcn-node/dcn-node.yaml || { \
	  sed 's#^  spool_dir: var/spool#  spool_dir: /var/lib/dcn-node/spool#' $(CONFIG) \
	    > /etc/dcn-node/dcn-node.yaml && \
	  chown root:dcn-node /etc/dcn-node/dcn-node.yaml && \
	  chmod 0640 /etc/dcn-node/dcn-node.yaml; }
	sed 's#/opt/dcn-node#$(INSTALL_DIR)#g' systemd/dcn-node.service \
	  > $(SYSTEMD_DIR)/dcn-node.service
	systemd-analyze verify $(SYSTEMD_DIR)/dcn-node.service
	for unit in dcn-node-receive.service dcn-node-worker@.service; do \
	  sed 's#/opt/dcn-node#$(INSTALL_DIR)#g' systemd/$$unit > $(SYSTEMD_DIR)/$$unit; done
	systemctl daemon-reload
	@echo "Installed. Set destinations in /etc/dcn-node/dcn-node.yaml, then:"
	@echo "  systemctl enable --now dcn-node && systemctl status dcn-node"
	@echo "Cluster mode (README): dcn-node-receive, and dcn-node-worker@N with"
	@echo "  /etc/dcn-node/worker-N.yaml per GPU, instead of dcn-node"

clean:
	rm -rf $(VENV) var build *.egg-info
