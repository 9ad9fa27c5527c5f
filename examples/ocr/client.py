"""Read the text of an image through the OCR mesh with a stock KServe v2 client (tritonclient).

python examples/ocr/client.py 127.0.0.1:8501              # a line rendered here
python examples/ocr/client.py 127.0.0.1:8501 page.png     # your own PNG or JPEG
"""

import io
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image, ImageDraw, ImageFont


def rendered() -> bytes:
    image = Image.new("RGB", (560, 120), "white")
    ImageDraw.Draw(image).text(
        (24, 36), "Hello from the mesh", fill="black", font=ImageFont.load_default(size=40)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    address = sys.argv[1]
    data = Path(sys.argv[2]).read_bytes() if len(sys.argv) > 2 else rendered()
    client = grpcclient.InferenceServerClient(address)
    image = grpcclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([data], dtype=object))
    answer = client.infer("ocr", [image], client_timeout=60)
    for text, score, box in zip(
        answer.as_numpy("texts"), answer.as_numpy("scores"), answer.as_numpy("boxes"), strict=True
    ):
        corners = " ".join(f"{x:.0f},{y:.0f}" for x, y in box)
        print(f"{text.decode()!r}  score {score:.3f}  box {corners}")


if __name__ == "__main__":
    main()
