#!/bin/bash
# Fill .whl/ with the oracle wheels bench/lent_gpu.sh installs on a lent GPU machine (which
# reaches no registry): the pins of pyproject.toml's `bench` extra that the GPU tests and
# benchmarks import (lion-pytorch, pytorch-optimizer, schedulefree, torchao), without their
# dependencies (torch and numpy are on the card's machine). Run here, before the device call:
#
#   bash bench/fetch_wheels.sh      # then pass carry: [".whl"] to the device tool
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t pins < <(python3 - <<'PY'
import tomllib

wanted = {"lion-pytorch", "pytorch-optimizer", "schedulefree", "torchao"}
extra = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"]
for pin in extra:
    if pin.split("==")[0] in wanted:
        print(pin)
PY
)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "${pins[@]}"
ls -l .whl
