# One command for the main job, one for the tests (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip resolves torch to a CUDA build on x86_64 Linux: the environment takes about 6 GB.
# Set MIN_FREE_GB=0 to skip the check.
MIN_FREE_GB ?= 7

$(BIN)/flowalign: pyproject.toml
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	if [ "$(MIN_FREE_GB)" != 0 ] && [ -n "$$free_kb" ] && [ "$$free_kb" -lt $$(( $(MIN_FREE_GB) * 1048576 )) ]; then \
		echo "make install: only $$(( free_kb / 1048576 )) GiB free here; the environment (.venv, torch included) needs about $(MIN_FREE_GB) GiB. Free some space or set MIN_FREE_GB=0 to try anyway." >&2; \
		exit 1; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip -q
	$(BIN)/python -m pip install -e '.[test]'
	touch $(BIN)/flowalign

.PHONY: install demo test bench
install: $(BIN)/flowalign

demo: install
	$(BIN)/flowalign train --overwrite

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: install
	$(BIN)/python bench/sampler_overhead.py
