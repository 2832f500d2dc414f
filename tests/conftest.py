import os
from pathlib import Path

# DeepSpeed compiles a small C++ op on first init; one shared cache means one compile per machine.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "attnres_train" / "torch_extensions"))

# Prepared token shards of the stdlib / hf sources go to one throw-away cache per test session (subprocesses
# inherit it), never into the user's ~/.cache.
if "ATTNRES_TRAIN_CACHE" not in os.environ:
    import tempfile

    os.environ["ATTNRES_TRAIN_CACHE"] = tempfile.mkdtemp(prefix="attnres-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="also run the tests marked long (minutes each on a 2-core CPU machine)")


def pytest_collection_modifyitems(config, items):
    skip_long = pytest.mark.skip(reason="long: run with --long")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "long" in item.keywords and not config.getoption("--long"):
            item.add_marker(skip_long)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def deepspeed_single_process():
    """DeepSpeed with a one-process group (CPU: gloo), for tests that drive real engines in this process."""
    deepspeed = pytest.importorskip("deepspeed")
    if not torch.distributed.is_initialized():
        from attnres_train.train.config import ParallelConfig, TrainConfig
        from attnres_train.train.engine import setup_distributed

        setup_distributed(ParallelConfig(), TrainConfig())  # the trainer's own one-process set-up
    return deepspeed
