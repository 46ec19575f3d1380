# Every target creates the virtualenv itself, so a fresh machine needs only `make demo` / `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
EXTRAS  ?= dev
comma   := ,
STAMP   := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: demo test lint install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kvant demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks conftest.py

# Two workers (this project's machines have 2 cores), whole files per worker: most of a cold run is Numba compiling
# the kernels, and the workers compile different ones side by side (415 -> 278 s from an empty cache, 2026-12-03).
TEST_WORKERS ?= 2

test: $(STAMP) lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

bench:
	$(MAKE) EXTRAS=dev,bench install
	@# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (needs root; say so if it cannot be installed).
	test -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	  echo "kvant: install dataset-fashion-mnist (apt) for the Fashion-MNIST benchmark cells"
	$(BIN)/python benchmarks/clustering.py
	$(BIN)/python benchmarks/pq.py
	$(BIN)/python benchmarks/covertree.py
	$(BIN)/python benchmarks/io_read.py
	$(BIN)/python benchmarks/dask_clustering.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
