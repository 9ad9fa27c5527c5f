"""What the OCR example's tests share: its folder, and its models fetched once if missing."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT

EXAMPLE = ROOT / "examples" / "ocr"


def fetch_models() -> None:
    if not (EXAMPLE / "recognize/ppocr-rec/1/model.onnx").exists():
        subprocess.run([sys.executable, str(EXAMPLE / "fetch_models.py")], check=True, timeout=600)
