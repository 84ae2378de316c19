import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Under pytest-xdist (`make test` runs one worker per core) each worker, and every subprocess it
# starts, gets its share of the cores instead of all of them: oversubscribed BLAS threads cost more
# than they give on tiny models.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _threads = str(max(1, (os.cpu_count() or 1) // _workers))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    os.environ.setdefault("MKL_NUM_THREADS", _threads)

import torch  # noqa: E402

if _workers > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from utils import ensure_torchvision  # noqa: E402

ensure_torchvision()
logging.getLogger("transformers").setLevel(logging.ERROR)
