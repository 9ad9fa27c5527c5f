"""Datasets for batch (no sockets): the same rows and keys from NPY, NPZ, CSV and Parquet."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.datasets import DatasetError, open_dataset
from services.common.types import TensorSpec
from tests.jobs.support import holdout

IMAGE = TensorSpec("image", "UINT8", (-1, 8, 8))


def read_all(path: Path, key: str | None = None, size: int = 50) -> tuple[list[str], np.ndarray]:
    dataset = open_dataset(path, [IMAGE], key=key)
    keys: list[str] = []
    parts = []
    for chunk in dataset.chunks(size):
        assert len(chunk) <= size
        keys += chunk.keys
        parts.append(chunk.inputs["image"])
    assert dataset.rows == len(keys)
    return keys, np.concatenate(parts)


def test_every_format_gives_the_same_rows(tmp_path: Path) -> None:
    images, labels = holdout()
    keys = [f"digit-{i:03d}" for i in range(len(images))]
    np.save(tmp_path / "d.npy", images)
    np.savez(tmp_path / "d.npz", images=images, labels=labels, id=np.array(keys))
    flat = images.reshape(len(images), 64)
    columns = ["id", "label", *[f"image_{i}" for i in range(64)]]
    with (tmp_path / "d.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for k, label, row in zip(keys, labels, flat, strict=True):
            writer.writerow([k, int(label), *row.tolist()])
    table = {"id": keys, **{f"image_{i}": flat[:, i] for i in range(64)}}
    pq.write_table(pa.table(table), tmp_path / "flat.parquet")
    pq.write_table(
        pa.table({"id": keys, "image": [row.tolist() for row in images]}), tmp_path / "nested.parquet"
    )

    npy_keys, _ = read_all(tmp_path / "d.npy")
    assert npy_keys == [str(i) for i in range(len(images))]
    for path in ("d.npy", "d.npz", "d.csv", "flat.parquet", "nested.parquet"):
        key = None if path == "d.npy" else "id"
        got_keys, got = read_all(tmp_path / path, key)
        assert got.dtype == np.uint8 and got.shape == images.shape, path
        np.testing.assert_array_equal(got, images, err_msg=path)
        if key:
            assert got_keys == keys, path


def test_bad_datasets_are_refused_with_a_reason(tmp_path: Path) -> None:
    np.save(tmp_path / "wrong.npy", np.zeros((4, 7, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"wants UINT8\[-1, 8, 8\]"):
        open_dataset(tmp_path / "wrong.npy", [IMAGE])
    np.save(tmp_path / "halves.npy", np.full((2, 8, 8), 0.5))
    with pytest.raises(DatasetError, match="not whole"):
        open_dataset(tmp_path / "halves.npy", [IMAGE])
    (tmp_path / "few.csv").write_text("id,image_0\na,1\n")
    with pytest.raises(DatasetError, match=r"image_0\.\.image_63"):
        open_dataset(tmp_path / "few.csv", [IMAGE])
    np.savez(tmp_path / "dup.npz", image=np.zeros((2, 8, 8), np.uint8), id=np.array(["a", "a"]))
    with pytest.raises(DatasetError, match="not unique"):
        open_dataset(tmp_path / "dup.npz", [IMAGE], key="id")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        (tmp_path / "x.txt").write_text("")
        open_dataset(tmp_path / "x.txt", [IMAGE])
    with pytest.raises(DatasetError, match="no such file"):
        open_dataset(tmp_path / "missing.npz", [IMAGE])


PAGE = TensorSpec("image", "BYTES", (-1, 1))


def test_a_folder_of_images_and_a_binary_parquet_column_give_the_files_bytes(tmp_path: Path) -> None:
    # Bytes with a trailing zero: NumPy's own bytes type would drop it.
    files = {"a.png": b"\x89PNG one\x00", "b.JPG": b"\xff\xd8 two", "sub/c.jpeg": b"\xff\xd8 three"}
    folder = tmp_path / "pages"
    (folder / "sub").mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "readme.txt").write_text("not a row")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.png").write_bytes(b"hidden")
    dataset = open_dataset(folder, [PAGE])
    chunks = list(dataset.chunks(2))
    assert dataset.name == "pages" and dataset.rows == 3 and [len(c) for c in chunks] == [2, 1]
    assert [k for c in chunks for k in c.keys] == sorted(files)
    rows = np.concatenate([c.inputs["image"] for c in chunks])
    assert rows.dtype == object and rows.shape == (3, 1)
    assert [r[0] for r in rows] == [files[k] for k in sorted(files)]

    pq.write_table(pa.table({"id": list(files), "image": list(files.values())}), tmp_path / "pages.parquet")
    (chunk,) = open_dataset(tmp_path / "pages.parquet", [PAGE], key="id").chunks(10)
    assert chunk.keys == list(files)
    assert [r[0] for r in chunk.inputs["image"]] == list(files.values())


def test_a_folder_needs_one_bytes_input_and_some_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no \.png, \.jpg, \.jpeg files"):
        open_dataset(tmp_path / "empty", [PAGE])
    with pytest.raises(DatasetError, match=r"one BYTES input; the graph has image UINT8\[-1, 8, 8\]"):
        open_dataset(tmp_path / "empty", [IMAGE])
