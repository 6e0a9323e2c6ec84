# make lab   install and open the course
# make test  install and run the whole test suite
# make slides build every deck (HTML and PDF) into slides/build/
#
# GPU: make lab TORCH_PIN=<version> TORCH_INDEX="--index-url <CUDA wheel index>"  (see README.md)

PYTHON      ?= python3
TORCH_PIN   ?= 2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

VENV       := .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
# The installed torch, as a pip constraint: later installs never replace it.
TORCH_LOCK := $(VENV)/torch-lock.txt

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv torch install-lab install-test chromium slides-deps slides lab test bench clean

venv: $(PY)

$(PY):
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }

# Install the pinned torch only if none is installed; an existing torch (CPU or GPU) is kept.
torch: venv
	@$(PY) -c "import importlib.metadata as m; m.version('torch')" 2>/dev/null \
	  || $(PIP) install $(TORCH_INDEX) "torch==$(TORCH_PIN)"
	@$(PY) -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(TORCH_LOCK)

# Stamps live in the venv, so deleting .venv resets them; editing pyproject.toml reinstalls.
$(VENV)/lab.stamp: pyproject.toml | torch
	$(PIP) install -c $(TORCH_LOCK) -e '.[lab]'
	@touch $@

# The test extra brings nbgrader, which switches its Lab and server extensions on for everyone
# using this environment. Learners do not need them; instructors use their own environment
# (docs/instructors.md).
NBGRADER_SERVER_EXTENSIONS := $(addprefix nbgrader.server_extensions.,formgrader \
  validate_assignment assignment_list course_list)

$(VENV)/test.stamp: pyproject.toml | torch
	$(PIP) install -c $(TORCH_LOCK) -e '.[lab,test]'
	@if [ -x $(VENV)/bin/nbgrader ]; then \
	  $(VENV)/bin/jupyter labextension disable --level=sys_prefix @jupyter/nbgrader >/dev/null 2>&1; \
	  $(VENV)/bin/jupyter server extension disable --sys-prefix $(NBGRADER_SERVER_EXTENSIONS) \
	    >/dev/null 2>&1; echo "nbgrader's Jupyter extensions are disabled in $(VENV)"; fi; true
	@touch $@ $(VENV)/lab.stamp

install-lab: $(VENV)/lab.stamp
install-test: $(VENV)/test.stamp

# tests/test_browser.py drives Debian's Chromium with playwright (never `playwright install`).
# Installed here when missing, as root with apt-get (CI); anywhere else, or if apt-get fails,
# those tests skip and say why. Set CHROMIUM_APT=0 to never run apt-get.
CHROMIUM     ?= /usr/bin/chromium
CHROMIUM_APT ?= 1
chromium:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$(CHROMIUM_APT)" = 1 ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make: installing Debian's chromium for the browser tests (apt-get, about 1 min)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	      >/dev/null; } || echo "make: apt-get could not install chromium; the browser tests will skip"; \
	else echo "make: $(CHROMIUM) is missing and not installed (needs root, apt-get and CHROMIUM_APT=1); the browser tests will skip"; fi

# The decks' toolchain: Marp CLI, exactly as slides/package-lock.json pins it (npm ci). Without
# npm, say so: `make slides` stops there and tests/test_slides.py skips with the reason.
NPM ?= npm
MARP_STAMP := slides/node_modules/.installed
slides-deps: $(MARP_STAMP)
$(MARP_STAMP): slides/package-lock.json
	@if command -v $(NPM) >/dev/null 2>&1; then \
	  cd slides && $(NPM) ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "make: npm is missing (Node.js 18+ builds the slides); the slide tests will skip"; fi

slides: install-test slides-deps chromium
	$(PY) slides/build.py

# learner_lab_config.py hides notebooks/source (the solutions) from the learners' lab.
lab: install-lab
	$(VENV)/bin/jupyter lab notebooks/ --config=learner_lab_config.py $(if $(filter 0,$(shell id -u)),--allow-root)

# Two pytest runs over tests/: first everything but the notebooks, one test at a time (the
# launcher tests are timing-sensitive); then the tests marked "notebook" (each learner and
# solution notebook run in a fresh kernel and graded, real nbgrader on a sample), two at a time:
# a notebook spends much of its time waiting for kernels and ranks; the browser tests (JupyterLab
# in headless Chromium), the slides (every deck built and looked at in Chromium), the benches'
# --quick run and labkit.train under torchrun run there too. PYTEST_ARGS goes to both.
# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: install-test chromium slides-deps
	@$(PY) -m pytest -m "not notebook" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: no tests collected"; rc=0; fi; \
	  $(PY) -m pytest -m notebook -n 2 $(PYTEST_ARGS); nb=$$?; \
	  if [ $$nb -eq 5 ]; then echo "make test: no notebook tests collected"; nb=0; fi; \
	  if [ $$rc -ne 0 ]; then exit $$rc; fi; exit $$nb

# Every benchmark in turn (bench/run_all.py: ours and the reference alternating in the same run),
# then one summary table, also written into bench/README.md with the machine it was measured on.
# BENCH_ARGS=--quick: a smoke run (every bench runs and computes its ratios; README untouched).
BENCH_ARGS ?=
bench: install-test
	$(PY) bench/run_all.py --write-readme $(BENCH_ARGS)

clean:
	rm -rf build dist slides/build *.egg-info .pytest_cache $(VENV)/*.stamp $(TORCH_LOCK)
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -prune -exec rm -rf {} +
