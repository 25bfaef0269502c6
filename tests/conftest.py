"""Shared pytest setup. Keep it minimal: every test file of the project uses it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, however pytest is started

import models  # noqa: E402,F401  FIRST: installs the torchvision guard before anything imports torchvision
import torch  # noqa: E402

torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slower test (full-size models); still run by default")
