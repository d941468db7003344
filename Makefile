# Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo bench bench-quick bench-cuda clean

$(STAMP): requirements.txt pyproject.toml runtime/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e . -e runtime
	touch $(STAMP)

venv: $(STAMP)

# The full suite: slow end-to-end tests run in their small CI configuration.
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q -ra

test-fast: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q -ra -m "not slow"

demo: $(STAMP)
	bash examples/aishell2/s0/demo.sh

# Whole-model RTF table (Dense-S / MoE per router / Dense-L, PyTorch and runtime, and
# each MoE with int8 / w8a8 experts; tens of minutes on 2 cores), the runtime's chunk-16
# gap split into dispatch and expert bytes, attention rescoring (padded vs prefix trees),
# then the per-layer MoE benchmark, the experts a streaming chunk reads and, after
# `make demo`, the trained demo MoE against its dense twin (bench/trained_rtf.py).
BENCH_WORK ?= /tmp/wenet_moe_rtf
bench: $(STAMP)
	PYTHONPATH=$(CURDIR):$(CURDIR)/runtime $(PY) bench/rtf.py --expert_precision fp32 int8 w8a8 \
		--work-dir $(BENCH_WORK)
	PYTHONPATH=$(CURDIR):$(CURDIR)/runtime $(PY) bench/runtime_expert_bytes.py \
		$(BENCH_WORK)/dense_s-5000-0 $(BENCH_WORK)/moe_topk-5000-0
	PYTHONPATH=$(CURDIR):$(CURDIR)/runtime $(PY) bench/rescoring.py \
		--exports $(BENCH_WORK)/dense_s-5000-0 $(BENCH_WORK)/moe_topk-5000-0
	PYTHONPATH=$(CURDIR):$(CURDIR)/runtime $(PY) bench/moe_layer.py
	PYTHONPATH=$(CURDIR):$(CURDIR)/runtime $(PY) bench/expert_reads.py \
		--config examples/aishell2/s0/conf/train_u2++_moe.yaml
	if [ -f demo/exp/demo_moe/avg_3.pt ]; then \
		PYTHONPATH=$(CURDIR):$(CURDIR)/runtime $(PY) bench/trained_rtf.py \
			--checkpoint demo/exp/demo_moe/avg_3.pt --wav_scp demo/data/test/wav.scp; fi

bench-quick: $(STAMP)
	PYTHONPATH=$(CURDIR):$(CURDIR)/runtime $(PY) bench/rtf.py --quick

# The CUDA tables (README "On a GPU"): with the machine's own torch, no virtual
# environment (a GPU machine's torch is a CUDA build; the venv's is the CPU wheel).
bench-cuda:
	bash bench/cuda_tables.sh

clean:
	rm -rf $(VENV) build *.egg-info
