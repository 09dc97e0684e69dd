"""Shared test settings: small thread count, deterministic seeds, the data root for CI."""

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    # CI points MEPROP_DATA at ../shared/data; do the same when it is beside the checkout.
    if "MEPROP_DATA" not in os.environ and SHARED_DATA.is_dir():
        os.environ["MEPROP_DATA"] = str(SHARED_DATA)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
