import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import ensure_torchvision  # noqa: E402

ensure_torchvision()
logging.getLogger("transformers").setLevel(logging.ERROR)
