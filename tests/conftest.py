import os

import pytest
import torch

# Child processes (CLI, torchrun) too: see _eager_mixing.
os.environ["RESSTREAM_COMPILE_MIXING"] = "off"


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
def _eager_mixing():
    """The suite runs the eager depth mixing: compiling kernels for every tiny test shape would
    cost minutes. The compiled path has its own tests (tests/residual/test_compiled.py)."""
    from resstream.residual import compiled

    mode = compiled.get_mode()
    compiled.set_mode("off")
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
