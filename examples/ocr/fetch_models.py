"""Put PaddleOCR's PP-OCRv4 ONNX models (from the rapidocr-onnxruntime wheel) into the OCR mesh.

    python examples/ocr/fetch_models.py        # what `make ocr-models` runs

Downloads the wheel with pip (no dependencies, nothing installed), checks its SHA-256, and takes
out of it the text detector, the angle classifier and the recognizer into the services' model
directories, and the recognizer's character set (kept in the ONNX file's metadata) into the CTC
decoder's. The files are git-ignored; running it again replaces them. Apache-2.0: see README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
WHEEL = "rapidocr-onnxruntime==1.4.4"
WHEEL_SHA256 = "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"
PACKAGE = "rapidocr_onnxruntime/models/"
#: The wheel's file -> where the mesh serves it from.
MODELS = {
    "ch_PP-OCRv4_det_infer.onnx": "detect/ppocr-det/1/model.onnx",
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": "angle/ppocr-cls/1/model.onnx",
    "ch_PP-OCRv4_rec_infer.onnx": "recognize/ppocr-rec/1/model.onnx",
}
RECOGNIZER = "ch_PP-OCRv4_rec_infer.onnx"
CHARACTERS = "ctc/ocr-ctc/1/characters.txt"


def fetch(dest: Path) -> list[Path]:
    """Download the wheel, check it and unpack the models into `dest`; the files written."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, WHEEL],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{wheel.name}: SHA-256 {digest}, expected {WHEEL_SHA256}")
        written = []
        with zipfile.ZipFile(wheel) as archive:
            for name, target in MODELS.items():
                path = dest / target
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(archive.read(PACKAGE + name))
                written.append(path)
    # The recognizer carries its character set in its metadata, one character a line, kept as is
    # (the decoder splits it as RapidOCR does).
    model = onnx.load(dest / MODELS[RECOGNIZER], load_external_data=False)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    characters = dest / CHARACTERS
    characters.parent.mkdir(parents=True, exist_ok=True)
    characters.write_bytes(metadata["character"].encode("utf-8"))
    return [*written, characters]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=HERE, help="the example's folder (default: %(default)s)")
    args = parser.parse_args()
    for path in fetch(args.dest):
        print(f"{path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
