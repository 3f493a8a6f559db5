import os

import pytest
import torch

# Child processes (CLI, torchrun) too: see _default_mixing.
os.environ["RESSTREAM_COMPILE_MIXING"] = "auto"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use tiny tensors: a second intra-op thread only adds synchronisation (and, on a
    shared 2-core machine, waits for the other core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _default_mixing():
    """The suite runs the default depth mixing: on a CPU the native kernels (residual/native.py,
    built once in about a second), eager where they cannot be built. The eager path
    (tests/residual/test_native.py) and the torch.compile kernels (test_compiled.py, compiling
    them for every tiny test shape would cost minutes) have their own tests."""
    from resstream.residual import compiled

    mode = compiled.get_mode()
    compiled.set_mode("auto")
    yield
    compiled.set_mode(mode)


@pytest.fixture
def inline_jobs(monkeypatch):
    """compare/sweep/scale runs executed in this process instead of one child process each
    (the child-process path itself is tested once, in test_scale)."""
    import resstream.compare.jobs as jobs

    class Proc:
        def __init__(self, target, args):
            self.target, self.args, self.exitcode = target, args, None

        def start(self):
            self.target(*self.args)
            self.exitcode = 0

        def join(self):
            pass

    class Ctx:
        Process = Proc

    monkeypatch.setattr(jobs.mp, "get_context", lambda method: Ctx())
