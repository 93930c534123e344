import os
import sys

# make tests/launch.py importable as `launch` (also inside spawned children, which inherit sys.path)
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
