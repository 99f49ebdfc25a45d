#!/usr/bin/env bash
# Build .venv-cookbook: tinker-cookbook 0.6.1 plus this project, for the jobs that
# tests/cookbook/ runs against the emulator. Usage: tools/install-cookbook.sh [PYTHON] [VENV]
#
# A venv of its own, not the project's .venv: the cookbook needs torch, and once torch is
# importable the tinker SDK imports it on `import tinker` (tinker/types/tensor_data.py), which
# would put seconds of start-up and hundreds of MB on every daemon the other tests start.
# Cookbook jobs are user processes anyway; the daemon never shares their interpreter.
#
# Why --no-deps: tinker-cookbook 0.6.1 declares `tml-renderers>=0.4.1`, and the package
# registry serves tml-renderers only up to 0.2.1, so a plain `pip install tinker-cookbook==0.6.1`
# cannot resolve. The cookbook imports tml_renderers lazily, only for the Inkling model
# families; the supervised and RL paths the tests run never import it. So the cookbook is
# installed without its declared dependencies, after everything else it declares
# (tools/cookbook-requirements.txt: the same list, minus tml-renderers).
#
# torch is pinned there to 2.13.0: pip takes that release as a CPU wheel from these
# machines' local wheel directory; an open range would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-python3.11}"
VENV="${2:-.venv-cookbook}"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# The project itself (no dev extras): a job may run under its job-side integration.
"$VENV/bin/python" -m pip install --quiet -e .
"$VENV/bin/python" -m pip install --quiet -r tools/cookbook-requirements.txt
"$VENV/bin/python" -m pip install --quiet --no-deps tinker-cookbook==0.6.1
# Fail here, not in the middle of the test run, if something the cookbook's loops need is missing.
"$VENV/bin/python" -c "import tinker_cookbook.supervised.train, tinker_cookbook.rl.train, torch; print('tinker-cookbook', tinker_cookbook.__version__, 'torch', torch.__version__)"
