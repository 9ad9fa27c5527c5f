"""Triton's system shared-memory extension: regions a client registers, tensors read and written there.

A client on the same host creates a POSIX shared-memory object (shm_open, e.g. tritonclient's
`create_shared_memory_region`), registers part of it under a name, then names the region in
a tensor's parameters (`shared_memory_region`, `_offset`, `_byte_size`) instead of sending the
bytes: inputs are read from it, outputs written into it. Every offset and size is checked
against the region before a byte is touched. No grpc here: both transports use it.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass

from services.common.errors import InvalidInput, MeshError, NotFound, from_status

SHM_DIR = "/dev/shm"
#: A shared-memory object's name: one path component, as shm_open takes it.
_KEY = re.compile(r"/?[A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class RegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int


class _Region:
    def __init__(self, status: RegionStatus, memory: mmap.mmap) -> None:
        self.status = status
        self.memory = memory


class SharedMemory:
    """The system shared-memory regions registered with one node, by name."""

    def __init__(self, directory: str = SHM_DIR) -> None:
        self.directory = directory
        self._regions: dict[str, _Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise InvalidInput("shared-memory region: a name is required")
        if name in self._regions:
            raise already_exists(f"shared-memory region '{name}' is already registered; unregister it first")
        if not _KEY.fullmatch(key) or key.strip("/") in (".", ".."):
            raise InvalidInput(
                f"shared-memory region '{name}': key {key!r} is not a shared-memory object name"
            )
        if byte_size <= 0:
            raise InvalidInput(f"shared-memory region '{name}': byte_size must be positive, got {byte_size}")
        path = os.path.join(self.directory, key.lstrip("/"))
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise InvalidInput(
                f"shared-memory region '{name}': cannot open key {key!r} ({exc.strerror}); "
                "create it with shm_open on this host first"
            ) from None
        try:
            size = os.fstat(fd).st_size
            if offset < 0 or offset + byte_size > size:
                raise InvalidInput(
                    f"shared-memory region '{name}': offset {offset} + byte_size {byte_size} exceeds "
                    f"the {size} bytes of key {key!r}"
                )
            memory = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._regions[name] = _Region(RegionStatus(name, key, offset, byte_size), memory)

    def unregister(self, name: str = "") -> None:
        """Unregister one region ("" = all); an unknown name is not an error (as in Triton)."""
        names = [name] if name else list(self._regions)
        for each in names:
            region = self._regions.pop(each, None)
            if region is not None:
                region.memory.close()

    def status(self, name: str = "") -> list[RegionStatus]:
        if not name:
            return [region.status for region in self._regions.values()]
        return [self._get(name).status]

    def read(self, name: str, offset: int, byte_size: int, tensor: str) -> bytes:
        """A copy of `byte_size` bytes at `offset` of a region (the client may reuse it at once)."""
        region = self._get(name, tensor)
        start = self._bounds(region, offset, byte_size, tensor)
        return bytes(region.memory[start : start + byte_size])

    def write(self, name: str, offset: int, byte_size: int, data: bytes, tensor: str) -> None:
        """Write an output's bytes; it must fit the `byte_size` the request gave."""
        region = self._get(name, tensor)
        start = self._bounds(region, offset, byte_size, tensor)
        if len(data) > byte_size:
            raise InvalidInput(
                f"output '{tensor}' needs {len(data)} bytes but shared_memory_byte_size is {byte_size}"
            )
        region.memory[start : start + len(data)] = data

    def close(self) -> None:
        self.unregister()

    def _get(self, name: str, tensor: str = "") -> _Region:
        region = self._regions.get(name)
        if region is None:
            about = f"tensor '{tensor}': " if tensor else ""
            known = ", ".join(sorted(self._regions)) or "none"
            raise NotFound(f"{about}shared-memory region '{name}' is not registered; registered: {known}")
        return region

    @staticmethod
    def _bounds(region: _Region, offset: int, byte_size: int, tensor: str) -> int:
        status = region.status
        if offset < 0 or byte_size < 0 or offset + byte_size > status.byte_size:
            raise InvalidInput(
                f"tensor '{tensor}': shared_memory_offset {offset} + shared_memory_byte_size {byte_size} "
                f"exceeds region '{status.name}' ({status.byte_size} bytes)"
            )
        return status.offset + offset


def already_exists(message: str) -> MeshError:
    return from_status("ALREADY_EXISTS", message)
