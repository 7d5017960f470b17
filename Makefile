# Every target is one line you could type yourself. `make` runs the whole main job.
.PHONY: all setup data catalog train convert demo test bench crossval own-sky clean

all: setup data catalog train convert demo

setup:
	python3 -m venv .venv && .venv/bin/pip install --upgrade pip && .venv/bin/pip install -e '.[train,dev]'

data:
	.venv/bin/nebula data stellarium --out data/stellarium

# The sky catalog the device looks positions up in (copy it beside the model on the Pi).
catalog:
	.venv/bin/nebula catalog build --out models/skycatalog.npz

train:
	.venv/bin/nebula train --data data/stellarium --out models/runs/main

# Refuses (exit 1, make stops) a model that fails the float/int8 gate; see README, "int8 against float".
convert:
	.venv/bin/nebula convert models/runs/main --out models/nebula.tflite

demo:
	.venv/bin/nebula classify --model models/nebula.tflite --files-from models/runs/main/test_images.txt

# Leave-photographers-out cross-validation: the figure recipes are chosen by (README, "Other photographers").
crossval:
	.venv/bin/nebula crossval --data data/stellarium --out models/crossval --repeats 3

# The review loop, measured: N labelled frames of a photographer held out (README, "Learn from your own sky").
own-sky:
	.venv/bin/nebula own-sky --data data/stellarium --photographer "Plover Hill Observatory" --n 10 --n 50 --draws 2 --out models/own_sky

test: .venv/bin/pytest
	.venv/bin/pytest

# `make test` on a fresh clone sets up first.
.venv/bin/pytest:
	$(MAKE) setup

bench:
	.venv/bin/nebula bench --model models/nebula.tflite --json models/bench.json

clean:
	rm -rf data/stellarium models/runs models/crossval models/own_sky models/nebula.tflite models/labels.txt models/manifest.json models/skycatalog.npz
