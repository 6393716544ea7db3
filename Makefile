# dcn-node: two set-up commands, `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CONFIG ?= config/dcn-node.yaml
# CPU build of torch; see README "GPU install" for CUDA machines.
TORCH_SPEC ?= torch==2.13.0
# Debian packages the test suite talks to as real peers.
TEST_DEBS := dcmtk dicom3tools orthanc orthanc-gdcm prometheus

.PHONY: run test venv test-deps system-deps lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test]"
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
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (run as root or install them)"; exit 1; fi; \
	fi

test-deps: venv system-deps

test: test-deps
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check dcn_node tests bench

bench: venv
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) var build *.egg-info
