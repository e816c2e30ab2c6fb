"""Shared test set-up: the same process hygiene as run.py, before MindSpore is imported."""

import sys
from pathlib import Path

from x3d_exp.launch import prepare_process

prepare_process()

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
