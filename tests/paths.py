"""Where the real data lives for tests: ``$CPCX_DATA``, else ``../shared/data`` beside the checkout (as CI lays it)."""
import os
from pathlib import Path

DATA_ROOT = Path(os.environ.get("CPCX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
VOC_ROOT = DATA_ROOT / "voc2012-mini" / "VOC2012"
