import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the default test run may reach the network
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def toy_pipe():
    from erasure.pipeline import load_pipeline

    return load_pipeline("toy")


@pytest.fixture(scope="session")
def oracle():
    from erasure.toy.oracle import Oracle

    return Oracle.load()


@pytest.fixture()
def random_pipe(tmp_path):
    from factories import random_toy_pipe

    return random_toy_pipe(tmp_path)
