import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tv_compat  # noqa: E402

tv_compat.ensure_torchvision()
logging.getLogger("transformers").setLevel(logging.ERROR)
