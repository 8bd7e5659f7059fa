# The two commands of the README, each self-contained on a fresh machine:
#   make demo   train the quick stage-1 preset and write one sample grid per class
#   make test   run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
RUN := runs/ddpm_fashion_quick

.PHONY: demo test book data browser install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,web]'
	touch $@

# Fashion-MNIST from Debian's package when we can install it; otherwise the loader
# uses $$FASHION_MNIST_DIR or downloads from the Hugging Face Hub. And the font the emoji dataset is drawn with.
data:
	@bash .ci/get-fashion-mnist
	@bash .ci/get-emoji-font

# Debian's chromium for the browser test of the web page (skipped without it, outside CI)
browser:
	@bash .ci/get-chromium

demo: install data
	$(PY) train.py configs/ddpm_fashion_quick.yaml train.resume=latest
	@for c in 0 1 2 3 4 5 6 7 8 9; do \
		$(PY) sample.py $(RUN) --class $$c --n 16 --out $(RUN)/samples/class-$$c.png | grep wrote || exit 1; \
	done

# every stage's GPU preset in dependency order, measured, one table (benchmarks/book.py; for a GPU)
book: install data
	$(PY) benchmarks/book.py

test: install data browser
	$(PY) -m pytest -q -n auto --maxschedchunk 1 --durations=15

clean:
	rm -rf runs/ddpm_fashion_tiny runs/autoencoder_fashion_tiny runs/latent_fashion_tiny runs/clip_fashion_tiny .pytest_cache
