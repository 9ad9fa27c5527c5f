"""Datasets for `batch`: rows of a graph's inputs, each with a key, read in chunks.

    .npy      one array, rows along the first axis, for a graph with one input; keys are row numbers
    .npz      one array per input (named like it, or its plural: `images` for `image`, or
              mapped with `--input image=pixels`); an optional key array (`--key`)
    .csv      a header; per input either one column named like it or flattened columns
              `<input>_0 .. <input>_<n-1>` (row-major, reshaped to the input's shape);
              an optional key column; other columns are ignored
    .parquet  the same columns as CSV, or one list column per input (needs pyarrow); a binary
              or string column feeds a BYTES input
    folder    one row per file (sorted by name; keys are the names relative to the folder), for a
              graph with one BYTES input: each row is the file's bytes, e.g. PNG or JPEG images

Values are cast to the input's datatype and checked against its shape (from the graph's
ModelMetadata) before anything is sent. A key identifies a row across runs: it is what makes
`batch` resumable, so it must be stable (a key column, or the row number of an append-only file).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from services.common.types import DATATYPE_TO_NUMPY, TensorSpec

SUFFIXES = (".npy", ".npz", ".csv", ".parquet")
#: Files of a folder dataset (other files, and hidden ones, are not rows).
FILE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """The dataset cannot be read or does not fit the graph's inputs; the message says why."""


@dataclass(frozen=True)
class Chunk:
    """Consecutive rows: their keys and one array per graph input (first axis = rows)."""

    keys: list[str]
    inputs: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, rows: Sequence[int] | slice) -> Chunk:
        index = rows if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        keys = self.keys[rows] if isinstance(rows, slice) else [self.keys[i] for i in rows]
        return Chunk(keys, {name: np.ascontiguousarray(a[index]) for name, a in self.inputs.items()})


class Dataset(Protocol):
    name: str
    path: Path

    @property
    def rows(self) -> int | None:
        """Row count when known without reading everything (progress ETA)."""

    def chunks(self, size: int) -> Iterator[Chunk]: ...


def open_dataset(
    path: Path,
    inputs: Sequence[TensorSpec],
    *,
    key: str | None = None,
    mapping: Mapping[str, str] | None = None,
) -> Dataset:
    """The dataset at `path` for a graph with these inputs (by file suffix)."""
    check_file(path)
    if path.is_dir():
        return FolderDataset(path, inputs)
    mapping = dict(mapping or {})
    unknown = set(mapping) - {spec.name for spec in inputs}
    if unknown:
        raise DatasetError(
            f"--input names {sorted(unknown)} are not inputs of the graph; its inputs: "
            f"{', '.join(s.name for s in inputs)}"
        )
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return NpyDataset(path, inputs, mapping)
    if suffix == ".npz":
        return NpzDataset(path, inputs, key, mapping)
    if suffix == ".csv":
        return CsvDataset(path, inputs, key, mapping)
    if suffix == ".parquet":
        return ParquetDataset(path, inputs, key, mapping)
    raise DatasetError(f"{path}: unknown dataset format '{suffix}'; expected one of {', '.join(SUFFIXES)}")


def check_file(path: Path) -> None:
    """DatasetError unless `path` is a readable file of a known format or a folder: checked
    before any connection is made, so a typo is reported as what it is."""
    if path.is_dir():
        return
    if not path.is_file():
        raise DatasetError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if path.suffix.lower() not in SUFFIXES:
        raise DatasetError(
            f"{path}: unknown dataset format '{path.suffix.lower()}'; expected one of {', '.join(SUFFIXES)}"
        )
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read it ({exc.strerror})") from None


def conform(spec: TensorSpec, values: np.ndarray, where: str) -> np.ndarray:
    """Rows of one input cast to its datatype and shaped like it (flat rows are reshaped)."""
    row_shape = tuple(spec.shape[1:])
    if spec.datatype == "BYTES":
        return _conform_bytes(spec, values, row_shape, where)
    dtype = DATATYPE_TO_NUMPY.get(spec.datatype)
    if dtype is None:
        raise DatasetError(f"{where}: input '{spec.name}' is {spec.datatype}; batch cannot read it")
    if (
        all(d >= 0 for d in row_shape)
        and len(row_shape) > 1
        and values.ndim == 2
        and values.shape[1] == math.prod(row_shape)
    ):
        values = values.reshape(len(values), *row_shape)  # flat rows (CSV, Parquet)
    elif values.ndim == 1 and row_shape == (1,):
        values = values.reshape(-1, 1)
    if not spec.accepts_shape(values.shape):
        raise DatasetError(
            f"{where}: input '{spec.name}' wants {spec.describe()} (rows first), found {list(values.shape)}"
        )
    if values.dtype != dtype:
        if dtype.kind in "iu" and values.dtype.kind == "f" and not np.all(values == np.round(values)):
            raise DatasetError(
                f"{where}: input '{spec.name}' is {spec.datatype} but the values are not whole"
            )
        values = values.astype(dtype)
    return np.ascontiguousarray(values)


def _conform_bytes(
    spec: TensorSpec, values: np.ndarray, row_shape: tuple[int, ...], where: str
) -> np.ndarray:
    """Rows of a BYTES input: an object array of bytes (str encoded as UTF-8)."""
    if values.dtype.kind not in "OSU":
        raise DatasetError(f"{where}: input '{spec.name}' is BYTES but the values are {values.dtype}")
    out: np.ndarray = np.empty(values.shape, dtype=object)
    for index, value in np.ndenumerate(values):
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, bytes):
            raise DatasetError(f"{where}: input '{spec.name}' is BYTES but holds {type(value).__name__}")
        out[index] = value
    if out.ndim == 1 and row_shape == (1,):
        out = out.reshape(-1, 1)
    if not spec.accepts_shape(out.shape):
        raise DatasetError(
            f"{where}: input '{spec.name}' wants {spec.describe()} (rows first), found {list(out.shape)}"
        )
    return out


def _pick_array(
    spec: TensorSpec, names: Sequence[str], arrays: Mapping[str, Any], mapping: Mapping[str, str], where: str
) -> str:
    if spec.name in mapping:
        if mapping[spec.name] not in names:
            raise DatasetError(f"{where}: no array '{mapping[spec.name]}' (has {', '.join(names)})")
        return mapping[spec.name]
    for candidate in (spec.name, spec.name + "s"):
        if candidate in names:
            return candidate
    fitting = [n for n in names if len(arrays[n].shape) == len(spec.shape)]
    if len(fitting) == 1:
        return fitting[0]
    raise DatasetError(
        f"{where}: cannot tell which array holds input '{spec.name}' (arrays: {', '.join(names)}); "
        f"say it with --input {spec.name}=ARRAY"
    )


class _ArrayDataset:
    """Whole arrays in memory (or memory-mapped), sliced into chunks."""

    def __init__(self, path: Path, keys: Sequence[str] | None, arrays: dict[str, np.ndarray]) -> None:
        self.path = path
        self.name = path.stem
        lengths = {name: len(a) for name, a in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise DatasetError(f"{path}: inputs have different row counts {lengths}")
        self._count = next(iter(lengths.values()), 0)
        if keys is not None and len(keys) != self._count:
            raise DatasetError(f"{path}: {len(keys)} keys for {self._count} rows")
        if keys is not None and len(set(keys)) != len(keys):
            raise DatasetError(f"{path}: the keys are not unique")
        self._keys = list(keys) if keys is not None else None
        self._arrays = arrays

    @property
    def rows(self) -> int | None:
        return self._count

    def chunks(self, size: int) -> Iterator[Chunk]:
        for start in range(0, self._count, size):
            stop = min(start + size, self._count)
            keys = self._keys[start:stop] if self._keys is not None else [str(i) for i in range(start, stop)]
            yield Chunk(keys, {n: np.ascontiguousarray(a[start:stop]) for n, a in self._arrays.items()})


class NpyDataset(_ArrayDataset):
    def __init__(self, path: Path, inputs: Sequence[TensorSpec], mapping: Mapping[str, str]) -> None:
        if len(inputs) != 1:
            raise DatasetError(
                f"{path}: a .npy file holds one array; the graph has inputs {[s.name for s in inputs]}: use .npz"
            )
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: cannot read: {exc}") from exc
        super().__init__(path, None, {inputs[0].name: conform(inputs[0], np.asarray(array), str(path))})


class NpzDataset(_ArrayDataset):
    def __init__(
        self, path: Path, inputs: Sequence[TensorSpec], key: str | None, mapping: Mapping[str, str]
    ) -> None:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: np.asarray(data[name]) for name in data.files}
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: cannot read: {exc}") from exc
        names = list(arrays)
        keys = None
        if key is not None:
            if key not in arrays:
                raise DatasetError(f"{path}: no key array '{key}' (has {', '.join(names)})")
            keys = [str(k) for k in arrays[key].tolist()]
            names.remove(key)
        picked = {spec.name: _pick_array(spec, names, arrays, mapping, str(path)) for spec in inputs}
        super().__init__(
            path,
            keys,
            {
                spec.name: conform(spec, arrays[picked[spec.name]], f"{path}:{picked[spec.name]}")
                for spec in inputs
            },
        )


def _columns_for(
    spec: TensorSpec, header: Sequence[str], mapping: Mapping[str, str], where: str
) -> list[int]:
    """Column indexes holding one input: `name`, or `name_0 .. name_<n-1>` in order."""
    base = mapping.get(spec.name, spec.name)
    if base in header:
        return [header.index(base)]
    size = math.prod(spec.shape[1:]) if all(d >= 0 for d in spec.shape[1:]) else -1
    flat = [f"{base}_{i}" for i in range(max(size, 0))]
    if size > 0 and all(c in header for c in flat):
        return [header.index(c) for c in flat]
    raise DatasetError(
        f"{where}: no column '{base}' and not every column {base}_0..{base}_{max(size, 1) - 1} "
        f"for input '{spec.name}' {spec.describe()}"
    )


class CsvDataset:
    """Streams a CSV file with a header, `size` rows at a time."""

    def __init__(
        self, path: Path, inputs: Sequence[TensorSpec], key: str | None, mapping: Mapping[str, str]
    ) -> None:
        self.path = path
        self.name = path.stem
        self._inputs = list(inputs)
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if not header:
            raise DatasetError(f"{path}: empty file; expected a header row")
        self._key = header.index(key) if key is not None and key in header else None
        if key is not None and self._key is None:
            raise DatasetError(f"{path}: no key column '{key}'")
        self._columns = {s.name: _columns_for(s, header, mapping, str(path)) for s in inputs}
        self._rows: int | None = None

    @property
    def rows(self) -> int | None:
        if self._rows is None:
            with self.path.open(newline="") as f:
                self._rows = max(sum(1 for _ in csv.reader(f)) - 1, 0)
        return self._rows

    def chunks(self, size: int) -> Iterator[Chunk]:
        with self.path.open(newline="") as f:
            reader = csv.reader(f)
            next(reader)
            number = 0
            while True:
                lines = [line for _, line in zip(range(size), reader, strict=False)]
                if not lines:
                    return
                keys = [
                    line[self._key] if self._key is not None else str(number + i)
                    for i, line in enumerate(lines)
                ]
                where = f"{self.path}: rows {number}..{number + len(lines) - 1}"
                inputs = {}
                for spec in self._inputs:
                    try:
                        values = np.array(
                            [[float(line[c]) for c in self._columns[spec.name]] for line in lines]
                        )
                    except (ValueError, IndexError) as exc:
                        raise DatasetError(f"{where}: input '{spec.name}': {exc}") from exc
                    if len(self._columns[spec.name]) == 1 and len(spec.shape) == 1:
                        values = values.reshape(-1)
                    inputs[spec.name] = conform(spec, values, where)
                number += len(lines)
                yield Chunk(keys, inputs)


class ParquetDataset:
    """Reads a Parquet file in record batches (pyarrow)."""

    def __init__(
        self, path: Path, inputs: Sequence[TensorSpec], key: str | None, mapping: Mapping[str, str]
    ) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DatasetError(
                f"{path}: reading Parquet needs pyarrow: pip install 'onnxmesh[parquet]'"
            ) from None
        self.path = path
        self.name = path.stem
        self._inputs = list(inputs)
        try:
            self._file = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError
            raise DatasetError(f"{path}: cannot read Parquet: {exc}") from exc
        header = list(self._file.schema_arrow.names)
        if key is not None and key not in header:
            raise DatasetError(f"{path}: no key column '{key}'")
        self._key = key
        self._columns = {
            s.name: [header[i] for i in _columns_for(s, header, mapping, str(path))] for s in inputs
        }

    @property
    def rows(self) -> int | None:
        return int(self._file.metadata.num_rows)

    def chunks(self, size: int) -> Iterator[Chunk]:
        number = 0
        for batch in self._file.iter_batches(batch_size=size):
            count = batch.num_rows
            keys = (
                [str(k) for k in batch.column(self._key).to_pylist()]
                if self._key is not None
                else [str(number + i) for i in range(count)]
            )
            where = f"{self.path}: rows {number}..{number + count - 1}"
            inputs = {}
            for spec in self._inputs:
                columns = self._columns[spec.name]
                if len(columns) == 1:
                    column = batch.column(columns[0]).to_pylist()
                    # dtype=object: NumPy's own bytes type would drop trailing zero bytes.
                    values = np.empty(count, dtype=object) if spec.datatype == "BYTES" else np.array(column)
                    if spec.datatype == "BYTES":
                        values[:] = column
                else:
                    values = np.stack(
                        [batch.column(c).to_numpy(zero_copy_only=False) for c in columns], axis=1
                    )
                inputs[spec.name] = conform(spec, values, where)
            number += count
            yield Chunk(keys, inputs)


class FolderDataset:
    """The image files of a folder (and its subfolders), one row each: the file's bytes."""

    def __init__(self, path: Path, inputs: Sequence[TensorSpec]) -> None:
        if len(inputs) != 1 or inputs[0].datatype != "BYTES":
            raise DatasetError(
                f"{path}: a folder feeds a graph with one BYTES input; the graph has "
                f"{', '.join(s.name + ' ' + s.describe() for s in inputs)}"
            )
        self.path = path
        self.name = path.name
        self._spec = inputs[0]
        self._files = sorted(
            f
            for f in path.rglob("*")
            if f.is_file()
            and f.suffix.lower() in FILE_SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(path).parts)
        )
        if not self._files:
            raise DatasetError(f"{path}: no {', '.join(FILE_SUFFIXES)} files in the folder")

    @property
    def rows(self) -> int | None:
        return len(self._files)

    def chunks(self, size: int) -> Iterator[Chunk]:
        for start in range(0, len(self._files), size):
            files = self._files[start : start + size]
            values = np.empty(len(files), dtype=object)
            for i, f in enumerate(files):
                try:
                    values[i] = f.read_bytes()
                except OSError as exc:
                    raise DatasetError(f"{f}: cannot read it ({exc.strerror})") from None
            keys = [f.relative_to(self.path).as_posix() for f in files]
            yield Chunk(keys, {self._spec.name: conform(self._spec, values, str(self.path))})
