"""Shared trainer-test fixtures: tiny offline models and the bundled dataset.

Nothing here touches the network: the Hub is switched off and the datasets cache lives in a
per-process temporary directory (also inherited by subprocesses such as torchrun), so test
runs neither read stale caches nor fill the user's.
"""

import os
import tempfile

import pytest

_DATASETS_CACHE = tempfile.TemporaryDirectory(prefix="rmjob-test-datasets-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", _DATASETS_CACHE.name)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rmjob_trainer.tiny import BUNDLED_DATASET_DIR, build_tiny_model  # noqa: E402  (after the env)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-init GPT-NeoX (pythia-like) model + tokenizer with a pad token."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_gpt_neox"))


@pytest.fixture(scope="session")
def tiny_llama_no_pad_dir(tmp_path_factory):
    """A tiny random-init Llama model whose tokenizer has no pad token."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama_no_pad"), arch="llama", pad_token=False)


@pytest.fixture(scope="session")
def bundled_dataset_dir():
    """The bundled sentiment preference dataset (Hub layout, train 2000 / test 300 rows)."""
    return BUNDLED_DATASET_DIR
