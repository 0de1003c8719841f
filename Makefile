# Everything installs itself into .venv from requirements.lock; only Python 3.11 is assumed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RAY_STAMP := $(VENV)/.ray-installed

.PHONY: demo ray-demo test lint bench bench-pool bench-quota bench-resume bench-progress bench-overhead bench-estimate bench-images bench-budget bench-batch bench-batch-budget bench-ray chaos sample-data clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The optional Ray engine (--engine ray), pinned; -c keeps every version requirements.lock pins.
$(RAY_STAMP): $(STAMP) requirements-ray.lock
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -r requirements-ray.lock
	touch $(RAY_STAMP)

demo: $(STAMP)
	rm -rf out/demo
	$(BIN)/vision-pipeline run configs/emulator.toml --manifest sample_data/manifest.csv --output out/demo

# The Ray extra too, so tests/test_ray.py runs (about a minute on one local 2-CPU Ray) rather than skips.
test: lint $(STAMP) $(RAY_STAMP)
	$(BIN)/python -m pytest -q

# The sample manifest captioned by 3 Ray workers on a local 2-CPU Ray against the built-in emulator.
ray-demo: $(RAY_STAMP)
	rm -rf out/ray-demo
	$(BIN)/vision-pipeline run configs/emulator.toml --manifest sample_data/manifest.csv --output out/ray-demo \
		--engine ray --workers 3

# The static checks, also run by `make test`: lint and format on all Python, strict types on the package.
lint: $(STAMP)
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/ruff format --check pipeline tests bench
	$(BIN)/mypy --strict pipeline

sample-data: $(STAMP)
	$(BIN)/python sample_data/make_samples.py

clean:
	rm -rf $(VENV) out .pytest_cache

# ~18 minutes: 3 runs of 3 minutes against the emulator's Azure quota, then 3 more with 5 % 5xx.
bench-quota: $(STAMP)
	$(BIN)/python bench/quota.py

# ~3 minutes: 5000 rows SIGKILLed 50 times at random moments, then run to completion; exactly-once figures
# and what the kills paid again (concurrency 8, 0.1 s latency, 2 % 500s, the output section's defaults).
chaos: $(STAMP)
	$(BIN)/python bench/chaos.py

# ~1 minute: start-up time and peak RSS of a resume over 1,000,000 committed rows (median of 3).
bench-resume: $(STAMP)
	$(BIN)/python bench/resume.py

# ~2 minutes: a 5000-row zero-latency emulator run with and without the progress display (median of 3).
bench-progress: $(STAMP)
	$(BIN)/python bench/progress_overhead.py

# ~12 minutes: rows/s and peak RSS of runs of 100,000 and 20,000 http(s)-URL rows against a zero-latency
# emulator (concurrency 64, rows_per_part 5000), beside a bare aiohttp loop posting the same bodies (median of 3).
bench-overhead: $(STAMP)
	$(BIN)/python bench/overhead.py

# ~2 minutes: header-only sizing of 20,000 generated JPEG/PNG files on 2 cores (median of 3), then the
# emulator run at detail low, high and auto against `estimate --observed`: rows that differ, cost difference.
bench-estimate: $(STAMP)
	$(BIN)/python bench/estimate_speed.py

# ~4 minutes (the first time 1 more, to generate 200 photos of 4000×3000): bytes sent per image at low and
# high, images prepared per second in threads and in processes, end-to-end rows/s at high (median of 3).
bench-images: $(STAMP)
	$(BIN)/python bench/images_bench.py

# ~5 minutes: 50 runs capped at a random $0.05–$2, manifests costing more; the emulator's bill vs each cap.
bench-budget: $(STAMP)
	$(BIN)/python bench/budget.py

# ~14 minutes: an endpoint pool of three quota-mode emulators (TPM 20k/40k/60k, 0.5 s latency), 3 minutes
# each: steady state against each quota's 10-s ceiling, one emulator SIGKILLed after 60 s, one answering
# 429 retry-after-ms 30000 for a minute, then one quota shared with a second client sending 30 % of it.
bench-pool: $(STAMP)
	$(BIN)/python bench/pool.py

# ~20-30 minutes on 2 cores: 20,000 rows of 1600×1200 photos at detail high through the emulator's Batch API
# with a 2-minute processing delay (plan + pack + upload time, file sizes, total time, cost against live),
# then 20 SIGKILLs across upload, create, poll and collect of a 5,000-row batch run (exactly-once figures).
bench-batch: $(STAMP)
	$(BIN)/python bench/batch.py

# ~10 minutes: 20 batch runs capped at a random $0.02–$0.30 (some jobs failing lines or expiring), manifests
# costing more; the emulator's Batch API bill vs each cap, then a rerun with 10x the cap finishing the rest.
bench-batch-budget: $(STAMP)
	$(BIN)/python bench/batch_budget.py

# ~15 minutes: 3 Ray workers on a local 2-CPU Ray against one emulator quota (3 min); 2,000 4000×3000 photos
# at high detail, local engine against 2 Ray workers; 3,000 rows with one worker SIGKILLed 5 times.
bench-ray: $(RAY_STAMP)
	$(BIN)/python bench/ray_bench.py
