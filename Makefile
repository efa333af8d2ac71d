# The two commands of the README. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUNS ?= runs
REPORT ?= reports/smoke

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-cache-dir -e '.[test]'
	touch $(STAMP)

# The smoke images come from float32 arithmetic on the CPU, whose last bits depend on the SIMD kernels
# a CPU offers (AVX2 or AVX-512) and can flip a pixel of the report's thumbnails. The demo pins them to
# AVX2 (oneDNN's ISA cap, MKL's conditional numerical reproducibility, ATen's kernels), so every x86-64
# machine writes the committed report byte for byte.
demo: export ONEDNN_MAX_CPU_ISA = AVX2
demo: export MKL_CBWR = AVX2
demo: export ATEN_CPU_CAPABILITY = avx2
demo: $(STAMP)
	$(BIN)/caphuman-bench run --method caphuman --preset smoke --runs-dir $(RUNS)
	$(BIN)/caphuman-bench run --method reference --preset smoke --runs-dir $(RUNS)
	$(BIN)/caphuman-bench report --runs-dir $(RUNS) --out $(REPORT) --html

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(RUNS)
