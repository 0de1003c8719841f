# Everything installs itself into .venv from requirements.lock; only Python 3.11 is assumed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-quota chaos sample-data clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	rm -rf out/demo
	$(BIN)/vision-pipeline run configs/emulator.toml --manifest sample_data/manifest.csv --output out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

sample-data: $(STAMP)
	$(BIN)/python sample_data/make_samples.py

clean:
	rm -rf $(VENV) out .pytest_cache
