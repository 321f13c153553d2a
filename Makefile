# Everything a fresh machine needs: `make demo` and `make test` each run `make setup` first when needed.
PY      := .venv/bin/python
ART     := artifacts
MODEL   := $(ART)/resnet_exits.pt2
BUNDLE  := $(ART)/resnet_exits.edgeexit
EPOCHS  ?= 4
SETUP   := .venv/.setup-done
READY   := $(ART)/.bundle-ready  # exported, calibrated and profiled

.PHONY: setup demo test test-fast bench lint clean

setup: $(SETUP)

$(SETUP): pyproject.toml constraints.txt
	@if [ "$$(id -u)" = 0 ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  echo "installing Debian packages (dataset-fashion-mnist, iproute2)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist iproute2; fi
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -c constraints.txt -e ".[export,tflite,tflite-export,data,plot,dev]"
	touch $(SETUP)

$(MODEL): | $(SETUP)
	@mkdir -p $(ART)
	$(PY) -m edgeexit train --arch resnet-exits --dataset fashion-mnist --epochs $(EPOCHS) --seed 0 --out $(MODEL)

# Export, calibrate (per-exit thresholds with a risk guarantee) and profile once per trained model.
$(READY): $(MODEL)
	$(PY) -m edgeexit export $(MODEL) --out $(BUNDLE) --force --formats onnx,tflite --quantize int8-dynamic \
	  --calibration-data fashion-mnist
	$(PY) -m edgeexit calibrate $(BUNDLE) --data fashion-mnist --split val --policy entropy --mode accuracy \
	  --epsilon 0.005 --delta 0.05
	$(PY) -m edgeexit profile $(BUNDLE) --role device --store
	$(PY) -m edgeexit profile $(BUNDLE) --role cloud --threads 2 --store
	touch $(READY)

demo: $(SETUP) $(READY)
	$(PY) -m edgeexit evaluate $(BUNDLE) --data fashion-mnist --split test --no-policy
	$(PY) -m edgeexit evaluate $(BUNDLE) --data fashion-mnist --split test
	$(PY) -m edgeexit plan $(BUNDLE) --device raspberry-pi-4 --network 4g --png $(ART)/plan.png
	@echo "== the planner's choice over an emulated 4G link (this small model answers fastest on the device)"
	$(PY) -m edgeexit demo $(BUNDLE) --data fashion-mnist --split test --network 4g --emulate-device raspberry-pi-4
	@echo "== the offload path forced: split after segment 1, int8 boundary tensors over the same link"
	$(PY) -m edgeexit demo $(BUNDLE) --data fashion-mnist --split test --network 4g --emulate-device raspberry-pi-4 \
	  --agent-split 1

test: $(SETUP)
	$(PY) -m pytest -q -ra

test-fast: $(SETUP)
	$(PY) -m pytest -q -ra -m "not slow"

bench: $(SETUP) $(MODEL)
	$(PY) benchmarks/split_overhead.py --model $(MODEL)
	$(PY) benchmarks/early_exit.py --model $(MODEL)
	$(PY) benchmarks/tflite.py --model $(MODEL)
	$(PY) benchmarks/wire.py --model $(MODEL)
	$(PY) -m edgeexit bench --model $(MODEL)
	$(PY) benchmarks/planner.py --model $(MODEL)

lint: $(SETUP)
	$(PY) -m ruff check .

clean:
	rm -rf $(ART) .pytest_cache
