# brpg-book: the two commands of the README.
#   make book   executes the CPU chapters on DigitScenes and builds _build/html/index.html
#   make test   unit tests (with the rendered-page check; the precision tests once more with
#               BRPG_NATIVE_BF16=1 and =0) + pytest --nbval over the book + paired-notebook sync check
# Both fetch MathJax once (npm, into the git-ignored _vendor/mathjax/, served as
# _static/mathjax/) so that the book's math is typeset without a network connection.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and explicitly; override for another build, e.g.
#   make test TORCH_SPEC="torch==2.5.1 torchvision==0.20.1"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= book,dev,xception,coco,slurm,segformer,tensorboard
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# A local MathJax: brpg.book.tools (a Sphinx extension here) copies it to the book's
# _static/mathjax/ and points mathjax_path at it when it is present. Not under _static/ itself:
# jupyter-book would add every .js file found there to every page.
MATHJAX_VERSION ?= 3.2.2
MATHJAX_DIR := _vendor/mathjax
MATHJAX := $(MATHJAX_DIR)/.mathjax-$(MATHJAX_VERSION)  # refetched when the version changes

.PHONY: book test venv lint format clean results mathjax mutate

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	rm -f $(VENV)/.installed-*
	touch $@

mathjax: $(MATHJAX)

# npm pack fetches the registry tarball and checks it against the registry's sha512. Only the
# combined TeX/MathML -> CommonHTML file and the components it loads on demand are kept (10 MB).
$(MATHJAX):
	@command -v npm >/dev/null || { echo "npm is needed to fetch MathJax (apt-get install npm)" >&2; exit 1; }
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	  (cd "$$tmp" && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null); \
	  tar -xzf "$$tmp"/mathjax-$(MATHJAX_VERSION).tgz -C "$$tmp"; \
	  mkdir -p "$$tmp"/keep; \
	  cp -r "$$tmp"/package/LICENSE "$$tmp"/package/es5/{tex-mml-chtml.js,input,output,ui,a11y,sre,adaptors} "$$tmp"/keep/; \
	  touch "$$tmp"/keep/.mathjax-$(MATHJAX_VERSION); \
	  rm -rf $(MATHJAX_DIR); mkdir -p $(dir $(MATHJAX_DIR)); mv "$$tmp"/keep $(MATHJAX_DIR)
	@echo "mathjax: $(MATHJAX_VERSION) in $(MATHJAX_DIR) ($$(du -sh $(MATHJAX_DIR) | cut -f1))"

book: venv mathjax
	rm -rf _build  # a fresh build re-executes every chapter
	$(VENV)/bin/jupyter-book build . -W -n --keep-going
	@echo "book: open _build/html/index.html"

test: venv mathjax
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest tests -q
	# the autocast tests again, as if this CPU had native bf16 and as if it had not, so that
	# every machine checks what `train.amp: auto` does on the other kind (tests/README.md)
	BRPG_NATIVE_BF16=1 $(VENV)/bin/pytest tests -q -m precision -p no:cacheprovider
	BRPG_NATIVE_BF16=0 $(VENV)/bin/pytest tests -q -m precision -p no:cacheprovider
	$(VENV)/bin/pytest --nbval-lax --nbval-cell-timeout=900 -p no:cacheprovider book -q

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Mutation testing of the core modules (mutmut, targeted tests per module; not part of CI):
#   make mutate                       every module of tools/mutate.py
#   make mutate MODULES="teacher bank" some of them; report in .mutmut/report.txt
MODULES ?=
mutate: venv
	$(PY) tools/mutate.py $(MODULES)

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf _build .pytest_cache
