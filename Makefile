# Bootstrap: a local virtual environment with everything installed through constraints.txt.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast install clean bench-psfhs bench-acdc bench-sunnybrook bench-latency bench-load bench-fuzz bench-plots bench-scale bench-scale-quick bench-gpu bench-mapping-step audit-sunnybrook audit-psfhs audit-acdc

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,service,flower,audit]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ppcmi demo

# Benchmarks (BENCHMARKS.md): each writes runs/bench-<dataset>/ and copies its results JSON/markdown to
# benchmarks/results/; a rerun skips finished methods. Datasets are read from ../shared/data.
SHARED_DATA ?= ../shared/data
bench-psfhs bench-acdc: bench-%: $(STAMP)
	$(VENV)/bin/ppcmi bench --dataset $* --data $(SHARED_DATA)/$* --out runs/bench-$*
	cp runs/bench-$*/results.json benchmarks/results/bench-$*.json
	cp runs/bench-$*/results.md benchmarks/results/bench-$*.md

bench-sunnybrook: $(STAMP)
	$(VENV)/bin/ppcmi bench --dataset sunnybrook_lv --data data/sunnybrook_lv --out runs/bench-sunnybrook_lv \
		--methods ppcmi_cpu,unet_centralized,ppcmi_cpu_pca,no_klt,per_hospital_mapping,no_skips,no_pyramid,unet_local,ppcmi_cpu_matched,ppcmi_published
	cp runs/bench-sunnybrook_lv/results.json benchmarks/results/bench-sunnybrook_lv.json
	cp runs/bench-sunnybrook_lv/results.md benchmarks/results/bench-sunnybrook_lv.md

bench-latency: $(STAMP)
	$(PY) benchmarks/latency.py --out benchmarks/results --configs cpu,compact --tag cpu
	$(PY) benchmarks/latency.py --out benchmarks/results --configs published --tag published

bench-load: $(STAMP)
	$(PY) benchmarks/load.py --out benchmarks/results

# >= 2,000 mutated requests at the real service over mutual TLS; fails unless zero 5xx (results: fuzz-service.{json,md})
bench-fuzz: $(STAMP)
	$(PY) benchmarks/fuzz_service.py --out benchmarks/results

# No size ceiling (issue 14, section 4): PSFHS at 256x256, published autoencoder widths, 8 copies per pair through
# stage 2, peak memory per phase -> benchmarks/results/scale.{json,md} (hours on 2 cores; bench-scale-quick: minutes).
bench-scale: $(STAMP)
	$(PY) benchmarks/scale.py --data $(SHARED_DATA)/psfhs

bench-scale-quick: $(STAMP)
	$(PY) benchmarks/scale.py --data $(SHARED_DATA)/psfhs --quick

# On a CUDA GPU (issue 15): PSFHS at 256x256, published widths and schedule, latency at batch 1 and 16 in fp32 and mixed
# precision, peak GPU memory -> benchmarks/results/gpu.{json,md}; QUICK=1: 2 epochs per stage and the full run's estimate
# (gpu-quick.{json,md}). Without a GPU it refuses in one line.
QUICK ?=
bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu.py --data $(SHARED_DATA)/psfhs $(if $(QUICK),--quick)

# The mapping network's training step on the CPU per execution variant (issue 15): fp32, channels-last, bf16 on 1 thread and on
# every core -> benchmarks/results/mapping-step.{json,md}; torch.compile separately (it compiles for minutes) -> mapping-step-compile.*
bench-mapping-step: $(STAMP)
	$(PY) benchmarks/mapping_step.py --out benchmarks/results
	$(PY) benchmarks/mapping_step.py --out benchmarks/results --configs demo --variants fp32,compile --tag compile

bench-plots: $(STAMP)
	$(PY) benchmarks/plots.py --results benchmarks/results

# Privacy audits (PRIVACY.md): a run per defence variant and `ppcmi audit` of each; results to benchmarks/results/privacy-<dataset>.*.
# A rerun skips finished variants and audits; psfhs/acdc reuse the ppcmi_cpu and no_skips runs of `make bench-<dataset>`
# (same settings). AUDIT_ARGS passes options, e.g. AUDIT_ARGS="--variants baseline,rotation".
AUDIT_ARGS ?=
audit-sunnybrook: $(STAMP)
	$(PY) benchmarks/privacy_audit.py --dataset sunnybrook_lv --data data/sunnybrook_lv --out runs/privacy-sunnybrook $(AUDIT_ARGS)

audit-psfhs audit-acdc: audit-%: $(STAMP)
	$(PY) benchmarks/privacy_audit.py --dataset $* --data $(SHARED_DATA)/$* --out runs/privacy-$* --reuse runs/bench-$* $(AUDIT_ARGS)

# Two pytest-xdist workers, a test file each at a time (its module fixtures built once), each on one torch thread
# (tests/conftest.py): both cores stay busy while one worker waits on Flower's processes; three workers were slower
# (BENCHMARKS.md, "The README's two commands"). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

# The suite without the tests marked slow (pytest -m slow lists them): under 2 minutes on 2 cores.
test-fast: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow" $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

clean:
	rm -rf $(VENV) runs build src/*.egg-info
