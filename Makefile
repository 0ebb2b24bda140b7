# The two commands a user needs: `make demo` and `make test`. Everything else is setup.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test lint typecheck unit bench bench-tasks clean

setup: $(STAMP)

# torch goes in first and alone, pinned: any package that asks for an unpinned torch would
# otherwise pull several GB of CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,demo]'
	$(VENV)/bin/edge-compress build-ops
	@# aarch64: the ops cross-compiled, and an emulated userland (QEMU) that checks them against x86-64;
	@# the emulated validation targets (x86_64-avx2, aarch64, aarch64-neon); headless Chromium for the
	@# report test.
	@# Optional here: missing Debian tools are installed only when we are root.
	@if [ "$$(uname -m)" = x86_64 ]; then \
		if [ "$$(id -u)" = 0 ] && ! (command -v aarch64-linux-gnu-g++ && command -v qemu-aarch64-static \
				&& command -v mmdebstrap && command -v chromium-headless-shell) >/dev/null 2>&1; then \
			echo "setup: installing Debian packages on this host (apt-get, as root): g++-aarch64-linux-gnu qemu-user-static mmdebstrap chromium-headless-shell"; \
			(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
				g++-aarch64-linux-gnu qemu-user-static mmdebstrap) >/dev/null 2>&1 || true; \
			(DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
				chromium-headless-shell) >/dev/null 2>&1 || echo "warning: no headless Chromium (the report test will be skipped)"; \
		fi; \
		$(VENV)/bin/edge-compress build-ops --arch aarch64 \
			|| echo "warning: the aarch64 native ops were not built (see above); everything else is set up"; \
		if [ "$$(id -u)" = 0 ]; then \
			$(PY) -m exporters.native.check_aarch64 --prepare >/dev/null \
				|| echo "warning: no emulated aarch64 userland (the aarch64 checks will be skipped)"; \
			$(VENV)/bin/edge-compress targets setup >/dev/null \
				|| echo "warning: the emulated validation targets are not set up (edge-compress targets setup)"; \
		fi; \
	fi
	touch $(STAMP)

demo: setup
	$(VENV)/bin/edge-compress run recipes/minilm-int8.yaml

lint: setup
	$(VENV)/bin/ruff check compress exporters tests benchmarks
	$(VENV)/bin/ruff format --check compress exporters tests benchmarks
	$(VENV)/bin/hadolint docker/*.Dockerfile

typecheck: setup
	$(VENV)/bin/mypy

unit: setup
	$(PY) -m pytest -q -m "not integration"

# Two workers (pytest-xdist), each test file on one of them: a file's module fixtures (the private Docker
# engine, a real-model run) exist once, in the order tests/conftest.py gives (the longest files first; xdist would
# otherwise hand out the files with the most tests first). `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2
test: lint typecheck
	$(PY) -m pytest -q -rs --durations=25 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

bench: setup
	$(PY) benchmarks/minilm_int8.py

# The reference task models against the alternatives (needs runs/NAME-int8 of recipes/NAME-int8.yaml).
bench-tasks: setup
	$(PY) benchmarks/tasks.py bbc-news snli brown-pos

clean:
	rm -rf $(VENV) runs build *.egg-info
