# Environment of the aishell2/s0 recipe: the repository's virtual environment,
# its tools/ and local/ on PATH, UTF-8 I/O.
RECIPE_ROOT=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
WENET_MOE_ROOT=$(cd "$RECIPE_ROOT/../../.." && pwd)
export WENET_MOE_ROOT
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$WENET_MOE_ROOT/.venv/bin/python" ]; then
    PYTHON="$WENET_MOE_ROOT/.venv/bin/python"
  else
    PYTHON=python3
  fi
fi
export PYTHON
export PATH="$(dirname "$PYTHON"):$WENET_MOE_ROOT/tools:$PATH"
export PYTHONPATH="$WENET_MOE_ROOT:$WENET_MOE_ROOT/runtime${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONIOENCODING=UTF-8
export LC_ALL=C.UTF-8
