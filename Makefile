# make demo: set up .venv (torch CPU build first, then the package), run the quickstart (host,
# arm, mali) and the Cortex-M deployment example.
# make test: the same set-up, then the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup toolchains plugins demo test bench clean

# Cross compilers and emulators for the arm, cortex-m and mali targets (Debian packages).
# libc6-dev-arm64-cross is a recommends of the aarch64 gcc: name it, or static links fail.
DEBS := gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user gcc-arm-none-eabi \
	libnewlib-arm-none-eabi qemu-system-arm pocl-opencl-icd ocl-icd-libopencl1 \
	ocl-icd-opencl-dev opencl-headers dataset-fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

setup: toolchains $(VENV)/.installed plugins

# The QEMU instruction-count plugin (backends/icount_plugin.c), built with gcc -shared -fPIC
# into the user cache folder, where backends/icount.py looks for it (named by its source hash).
plugins: toolchains $(VENV)/.installed
	$(PY) -m qcompiler.backends.icount

toolchains:
	@dpkg -s $(DEBS) >/dev/null 2>&1 || { $(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBS); }

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(PY) examples/quickstart.py
	$(PY) examples/mcu_deploy.py

test: setup
	$(PY) -m pytest -q tests --durations=25

bench: setup
	$(PY) benchmarks/host.py

clean:
	rm -rf $(VENV) build *.egg-info
