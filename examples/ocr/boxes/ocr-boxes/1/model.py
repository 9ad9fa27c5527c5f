"""Boxes and crops: DBNet's probability map -> text boxes, and each box cut out for the next steps.

As PaddleOCR's DBPostProcess and RapidOCR do it: the map is thresholded (`thresh`) and dilated,
each contour's minimum-area rectangle is scored by the mean probability inside it (kept above
`box_thresh`), grown by `unclip_ratio` (Vatti clipping) and scaled onto the image. Boxes are
ordered top to bottom, left to right; each is cut out with a perspective warp (tall ones turned
90 degrees) and sized twice: `cls_input` [n, 3, 48, 192] for the angle classifier and `rec_input`
[n, 3, 48, W] for the recognizer, W being the widest line's width (at least 320) as RapidOCR
pads a batch, rounded up to a multiple of `rec_width_step`. Only lines of one width batch together
at the recognizer: a step of 160 lets more requests share a batch, but the recognizer reads a line
padded more than RapidOCR pads it a little differently (a space, a score), so the default is 1. `widths` is how much of each rec_input row is the line (the rest is padding).
`boxes` are [n, 4, 2] (x, y) corners on the image as sent, clockwise from the top left.
"""

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyclipper
from shapely.geometry import Polygon

REC_HEIGHT = 48
REC_MIN_WIDTH = 320
CLS_WIDTH = 192


class Boxes:
    def load(self, version_dir: Path, config: dict[str, Any]) -> None:
        p = config["parameters"]
        self.thresh = float(p["thresh"])
        self.box_thresh = float(p["box_thresh"])
        self.max_candidates = int(p["max_candidates"])
        self.unclip_ratio = float(p["unclip_ratio"])
        self.min_size = int(p["min_size"])
        self.rec_width_step = int(p["rec_width_step"])

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        probability = inputs["probability"][0, 0]
        image = inputs["image"][0]
        raw_h, raw_w, ratio_h, ratio_w, top = (float(v) for v in inputs["geometry"][0])
        boxes = self.detect(probability, image.shape[0], image.shape[1])
        crops = [crop(image, box) for box in boxes]
        # RapidOCR's batch width: the widest line's (truncated), at least REC_MIN_WIDTH; each line
        # its own width rounded up, within it.
        ratios = [c.shape[1] / c.shape[0] for c in crops]
        widest = int(REC_HEIGHT * max([REC_MIN_WIDTH / REC_HEIGHT, *ratios]))
        rec_widths = [min(math.ceil(REC_HEIGHT * ratio), widest) for ratio in ratios]
        width = math.ceil(widest / self.rec_width_step) * self.rec_width_step
        cls_input = np.zeros((len(crops), 3, REC_HEIGHT, CLS_WIDTH), dtype=np.float32)
        rec_input = np.zeros((len(crops), 3, REC_HEIGHT, width), dtype=np.float32)
        for i, (c, w) in enumerate(zip(crops, rec_widths, strict=True)):
            cls_w = min(CLS_WIDTH, math.ceil(REC_HEIGHT * c.shape[1] / c.shape[0]))
            cls_input[i, :, :, :cls_w] = normalize(cv2.resize(c, (cls_w, REC_HEIGHT)))
            rec_input[i, :, :, :w] = normalize(cv2.resize(c, (w, REC_HEIGHT)))
        # Back onto the image as sent: undo the letterbox, then the resize; clip to the image.
        origin = np.array(boxes, dtype=np.float32).reshape(-1, 4, 2)
        origin[..., 1] -= top
        origin[..., 0] *= ratio_w
        origin[..., 1] *= ratio_h
        origin = np.maximum(origin, 0)
        origin[..., 0] = np.minimum(origin[..., 0], raw_w)
        origin[..., 1] = np.minimum(origin[..., 1], raw_h)
        return {
            "boxes": origin,
            "cls_input": cls_input,
            "rec_input": rec_input,
            "widths": np.array(rec_widths, dtype=np.float32),
        }

    def detect(self, pred: np.ndarray, height: int, width: int) -> list[np.ndarray]:
        """The text boxes of a probability map, on an image of height x width, in reading order."""
        mask = cv2.dilate((pred > self.thresh).astype(np.uint8), np.array([[1, 1], [1, 1]]))
        contours, _ = cv2.findContours(mask * 255, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        map_h, map_w = mask.shape
        boxes = []
        for contour in contours[: self.max_candidates]:
            points, short_side = mini_box(contour)
            if short_side < self.min_size or box_score(pred, points) < self.box_thresh:
                continue
            points, short_side = mini_box(self.unclip(points))
            if short_side < self.min_size + 2:
                continue
            points[:, 0] = np.clip(np.round(points[:, 0] / map_w * width), 0, width)
            points[:, 1] = np.clip(np.round(points[:, 1] / map_h * height), 0, height)
            box = clockwise(points.astype(np.int32).astype(np.float32))
            box[:, 0] = np.clip(box[:, 0], 0, width - 1).astype(np.int32)
            box[:, 1] = np.clip(box[:, 1], 0, height - 1).astype(np.int32)
            if int(np.linalg.norm(box[0] - box[1])) <= 3 or int(np.linalg.norm(box[0] - box[3])) <= 3:
                continue
            boxes.append(box)
        return reading_order(boxes)

    def unclip(self, box: np.ndarray) -> np.ndarray:
        poly = Polygon(box)
        distance = poly.area * self.unclip_ratio / poly.length
        offset = pyclipper.PyclipperOffset()
        offset.AddPath(box, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
        return np.array(offset.Execute(distance)).reshape((-1, 1, 2))


def mini_box(contour: np.ndarray) -> tuple[np.ndarray, float]:
    """The minimum-area rectangle's corners (top left, top right, bottom right, bottom left) and
    its short side."""
    rect = cv2.minAreaRect(contour)
    points = sorted(cv2.boxPoints(rect), key=lambda p: p[0])
    left = (0, 1) if points[1][1] > points[0][1] else (1, 0)
    right = (2, 3) if points[3][1] > points[2][1] else (3, 2)
    box = np.array([points[left[0]], points[right[0]], points[right[1]], points[left[1]]])
    return box, min(rect[1])


def box_score(pred: np.ndarray, box: np.ndarray) -> float:
    """The mean probability inside the box."""
    h, w = pred.shape
    xmin = int(np.clip(np.floor(box[:, 0].min()), 0, w - 1))
    xmax = int(np.clip(np.ceil(box[:, 0].max()), 0, w - 1))
    ymin = int(np.clip(np.floor(box[:, 1].min()), 0, h - 1))
    ymax = int(np.clip(np.ceil(box[:, 1].max()), 0, h - 1))
    mask = np.zeros((ymax - ymin + 1, xmax - xmin + 1), dtype=np.uint8)
    shifted = box - np.array([xmin, ymin])
    cv2.fillPoly(mask, shifted.reshape(1, -1, 2).astype(np.int32), 1)
    return float(cv2.mean(pred[ymin : ymax + 1, xmin : xmax + 1], mask)[0])


def clockwise(pts: np.ndarray) -> np.ndarray:
    """Corners ordered top left, top right, bottom right, bottom left."""
    by_x = pts[np.argsort(pts[:, 0]), :]
    left, right = by_x[:2], by_x[2:]
    tl, bl = left[np.argsort(left[:, 1]), :]
    tr, br = right[np.argsort(right[:, 1]), :]
    return np.array([tl, tr, br, bl], dtype=np.float32)


def reading_order(boxes: list[np.ndarray]) -> list[np.ndarray]:
    """Top to bottom, then left to right among boxes whose tops are within 10 pixels."""
    ordered = sorted(boxes, key=lambda b: (b[0][1], b[0][0]))
    for i in range(len(ordered) - 1):
        for j in range(i, -1, -1):
            if abs(ordered[j + 1][0][1] - ordered[j][0][1]) < 10 and ordered[j + 1][0][0] < ordered[j][0][0]:
                ordered[j], ordered[j + 1] = ordered[j + 1], ordered[j]
            else:
                break
    return ordered


def crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The box cut out and straightened; a box at least 1.5 times taller than wide is turned."""
    width = int(max(np.linalg.norm(box[0] - box[1]), np.linalg.norm(box[2] - box[3])))
    height = int(max(np.linalg.norm(box[0] - box[3]), np.linalg.norm(box[1] - box[2])))
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(box.astype(np.float32), target)
    out = cv2.warpPerspective(
        image, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC
    )
    return np.rot90(out) if out.shape[0] / out.shape[1] >= 1.5 else out


def normalize(img: np.ndarray) -> np.ndarray:
    """HWC uint8 -> CHW float32 in [-1, 1]."""
    return (img.astype(np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5
