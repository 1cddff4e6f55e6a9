# `make serve` and `make test` do all set-up on a fresh machine (Python 3.11, no GPU).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tandem-installed
# Debian's Chromium, for the web console's browser tests (tests/test_console.py, via Playwright).
CHROMIUM := /usr/bin/chromium

.PHONY: serve test bench

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch from local disk first: a plain `torch` requirement would pull CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# SGLang and LMDeploy without their dependencies: each pins a torch of its own (sglang ==2.14.1,
	# lmdeploy <=2.12.1). Here they give agent programs SGLang's frontend, and `check` / the adapter
	# tests their real config and output classes; GPU replicas get full installs in their own
	# runtime_env (README: Engines).
	$(PY) -m pip install -q --no-deps sglang==0.5.23 lmdeploy==0.18.0
	$(PY) -m pip install -q orjson msgspec IPython setproctitle pybase64 pyzmq pillow \
		mmengine-lite shortuuid fire partial_json_parser openai_harmony
	touch $(STAMP)

serve: $(STAMP)
	$(PY) -m cluster run cluster.yaml

test: $(CHROMIUM) $(STAMP)
	$(PY) -m pytest -q -ra

# Installed when missing, as root (CI runs as root), else through sudo. Playwright's own browser
# download (`playwright install`) is not used.
$(CHROMIUM):
	if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

bench: $(STAMP)
	$(PY) benchmarks/gateway_vs_direct.py
