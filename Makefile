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

demo: $(STAMP)
	$(BIN)/caphuman-bench run --method caphuman --preset smoke --runs-dir $(RUNS)
	$(BIN)/caphuman-bench run --method reference --preset smoke --runs-dir $(RUNS)
	$(BIN)/caphuman-bench report --runs-dir $(RUNS) --out $(REPORT) --html

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(RUNS)
