#!/usr/bin/env bash
# Install tinker-cookbook 0.6.1 into the project's venv, for the tests in tests/cookbook/.
#
# Why --no-deps: tinker-cookbook 0.6.1 declares `tml-renderers>=0.4.1`, and the package
# registry serves tml-renderers only up to 0.2.1, so a plain `pip install tinker-cookbook==0.6.1`
# cannot resolve. The cookbook imports tml_renderers lazily, only for the Inkling model
# families, and the supervised and RL paths the tests run never import it. So the cookbook
# is installed without its declared dependencies, and everything else it declares is
# installed first from tools/cookbook-requirements.txt (the same list, minus tml-renderers).
#
# torch is pinned there to 2.13.0: pip takes that release as a CPU wheel from these
# machines' local wheel directory; an open range would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
"$PY" -m pip install --quiet -r tools/cookbook-requirements.txt
"$PY" -m pip install --quiet --no-deps tinker-cookbook==0.6.1
# Fail here, not in the middle of the test run, if something the supervised path needs is missing.
"$PY" -c "import tinker_cookbook.supervised.train, tinker_cookbook.rl.train, torch; print('tinker-cookbook', tinker_cookbook.__version__, 'torch', torch.__version__)"
