"""Fixtures for the field reports' scripts (tests/compat/README.md): the demo model loaded once per session
the way the scripts load it, and the tensor flavour the scripts ask for.

The scripts use torch (return_tensors="pt", torch.no_grad, torch.exp); CI has no torch, so every test that
needs tensors runs with numpy ("np", np.exp) and, where torch is importable, with "pt" as well."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # compat_util
from compat_util import HAS_TORCH, Tensors  # noqa: E402


@pytest.fixture(scope="session", params=["np", pytest.param("pt", marks=pytest.mark.skipif(
    not HAS_TORCH, reason="torch is not installed: the scripts' return_tensors='pt' form runs only where it is"))])
def tensors(request):
    return Tensors(request.param)


@pytest.fixture(scope="session")
def model_path(demo_gguf):
    """The demo model (SmolLM2-135M-Instruct, Q4_1 GGUF): the scripts' `model_name` / `path`."""
    return demo_gguf


@pytest.fixture(scope="session")
def tokenizer(model_path):
    import fastload as transformers
    return transformers.AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def model(model_path):
    """Loaded as the Qwen recipe loads it (torch_dtype="auto", device_map="auto"), once per session.
    Tests that change a model (half(), save, generation_config) load their own."""
    import fastload as transformers
    return transformers.AutoModelForCausalLM.from_pretrained(model_path, torch_dtype="auto", device_map="auto")
