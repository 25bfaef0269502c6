#!/usr/bin/env bash
# Run the test suite (CPU only). Sets up .venv on first use. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
exec python -m pytest -q "$@" tests
