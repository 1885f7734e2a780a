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


def make_random_toy_pipe(tmp_dir, seed: int = 0):
    """The toy architecture with random weights: instant, for tests of mechanics (not of image quality)."""
    from diffusers import StableDiffusionPipeline

    from erasure.toy import models
    from erasure.toy.tokenizer import build_tokenizer_files, load_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(build_tokenizer_files(tmp_dir / "tokenizer"))
    pipe = StableDiffusionPipeline(
        vae=models.make_vae(), text_encoder=models.make_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=models.make_unet(), scheduler=models.make_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def random_pipe(tmp_path):
    return make_random_toy_pipe(tmp_path)
