"""Decode, resize and normalize: one PNG or JPEG -> the text detector's input (RapidOCR's steps).

`image` (BYTES [1]) is decoded to BGR; an image whose longest side is over `max_side_len` is
shrunk, one whose shortest is under `min_side_len` grown (both to multiples of 32); a very flat
one is letterboxed top and bottom. That image is what the boxes step crops from (`image`); the
detector sees it resized so that its shortest side is `limit_side_len` (multiples of 32), scaled
to [-1, 1], channels first (`det_input`). `geometry` = [raw height, raw width, ratio_h, ratio_w,
letterbox top] maps boxes back onto the image as sent.
"""

import io
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

FORMATS = ["PNG", "JPEG"]
MEAN = np.array([0.5, 0.5, 0.5])
STD = np.array([0.5, 0.5, 0.5])


class Decode:
    def load(self, version_dir: Path, config: dict[str, Any]) -> None:
        p = config["parameters"]
        self.max_pixels = int(p["max_pixels"])
        self.max_side_len = int(p["max_side_len"])
        self.min_side_len = int(p["min_side_len"])
        self.min_height = int(p["min_height"])
        self.width_height_ratio = float(p["width_height_ratio"])
        self.limit_side_len = int(p["limit_side_len"])

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        encoded = inputs["image"]
        if encoded.size != 1:
            raise ValueError(f"input 'image': one encoded image per request, got {encoded.size}")
        raw = self.decode(encoded.reshape(-1)[0])
        raw_h, raw_w = raw.shape[:2]
        img, ratio_h, ratio_w = raw, 1.0, 1.0
        if max(raw_h, raw_w) > self.max_side_len:
            img, ratio_h, ratio_w = resize_32(raw, self.max_side_len / max(raw_h, raw_w))
        if min(img.shape[:2]) < self.min_side_len:
            img, ratio_h, ratio_w = resize_32(img, self.min_side_len / min(img.shape[:2]))
        img, top = self.letterbox(img)
        det_input = self.det_input(img)
        geometry = np.array([[raw_h, raw_w, ratio_h, ratio_w, top]], dtype=np.float32)
        return {"det_input": det_input, "image": img[np.newaxis], "geometry": geometry}

    def decode(self, data: Any) -> np.ndarray:
        if not isinstance(data, bytes):
            raise TypeError(f"input 'image': expected encoded bytes, got {type(data).__name__}")
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                # The header's size, before any pixel is decoded: no decompression bombs.
                if image.width * image.height > self.max_pixels:
                    raise ValueError(
                        f"input 'image': {image.width}x{image.height} is over {self.max_pixels} pixels"
                    )
                image.load()
                if image.mode == "1":
                    image = image.convert("L")
                elif image.mode not in ("L", "LA", "RGB", "RGBA"):
                    image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
                array = np.asarray(image)
        except UnidentifiedImageError:
            raise ValueError("input 'image': not a PNG or JPEG image") from None
        except ValueError:
            raise
        except Exception as exc:
            # Pillow raises several kinds (OSError, SyntaxError...) for a damaged file.
            raise ValueError(f"input 'image': a PNG or JPEG that cannot be decoded ({exc})"[:300]) from None
        return to_bgr(array)

    def letterbox(self, img: np.ndarray) -> tuple[np.ndarray, int]:
        """Pad a flat image (or a very short one) top and bottom, as RapidOCR does before detection."""
        h, w = img.shape[:2]
        if h > self.min_height and w / h <= self.width_height_ratio:
            return img, 0
        new_h = max(int(w / self.width_height_ratio), self.min_height) * 2
        top = int(abs(new_h - h) / 2)
        return cv2.copyMakeBorder(img, top, top, 0, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0)), top

    def det_input(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        ratio = self.limit_side_len / min(h, w) if min(h, w) < self.limit_side_len else 1.0
        resize_h = round(int(h * ratio) / 32) * 32
        resize_w = round(int(w * ratio) / 32) * 32
        if resize_h <= 0 or resize_w <= 0:
            raise ValueError(f"input 'image': {w}x{h} is too small to read")
        resized = cv2.resize(img, (resize_w, resize_h))
        # RapidOCR's arithmetic exactly (float32 pixels, float64 mean and std).
        normalized = (resized.astype(np.float32) * (1 / 255.0) - MEAN) / STD
        return normalized.transpose(2, 0, 1)[np.newaxis].astype(np.float32)


def resize_32(img: np.ndarray, ratio: float) -> tuple[np.ndarray, float, float]:
    """Scale by `ratio`, each side rounded to a multiple of 32; the ratios back to the original."""
    h, w = img.shape[:2]
    resize_h = round(int(h * ratio) / 32) * 32
    resize_w = round(int(w * ratio) / 32) * 32
    if resize_h <= 0 or resize_w <= 0:
        raise ValueError(f"input 'image': {w}x{h} is too narrow to read")
    return cv2.resize(img, (resize_w, resize_h)), h / resize_h, w / resize_w


def to_bgr(array: np.ndarray) -> np.ndarray:
    """Pillow's array (L, LA, RGB or RGBA) as 3-channel BGR, transparency as RapidOCR treats it."""
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2BGR)
    channels = array.shape[2]
    if channels == 3:
        return cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if channels == 2:
        gray = cv2.cvtColor(array[..., 0], cv2.COLOR_GRAY2BGR)
        alpha = array[..., 1]
        background = cv2.cvtColor(cv2.bitwise_not(alpha), cv2.COLOR_GRAY2BGR)
        return cv2.add(cv2.bitwise_and(gray, gray, mask=alpha), background)
    r, g, b, a = cv2.split(array)
    bgr = cv2.bitwise_and(cv2.merge((b, g, r)), cv2.merge((b, g, r)), mask=a)
    if np.mean(bgr) <= 0.0:
        return cv2.add(bgr, cv2.cvtColor(cv2.bitwise_not(a), cv2.COLOR_GRAY2BGR))
    return cv2.bitwise_not(bgr)
