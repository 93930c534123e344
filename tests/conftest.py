import os
import sys

# make tests/launch.py importable as `launch` (also inside spawned children, which inherit sys.path)
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    """Register the ``cuda`` marker of the GPU tests (tests/gpu/)."""
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config, items):
    """Mark ``namespaced`` every test whose module takes Lightning from ``lightning_ns``."""
    import lightning_ns
    import pytest

    shared = {id(v) for v in (lightning_ns.pl, lightning_ns.CompressedDDP, lightning_ns.CommunicationMonitor)}
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and any(id(v) in shared for v in vars(module).values()):
            item.add_marker(pytest.mark.namespaced)
