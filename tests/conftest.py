import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
