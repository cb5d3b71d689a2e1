"""In-memory backstore for tests: a bytearray plus a per-block mapped/deallocated map."""
from __future__ import annotations

SUPPORTED_BLOCK_SIZES = (512, 4096)


class RamBackstore:
    """Blocks in a bytearray; every block starts deallocated (reads as zeroes).

    The provisioning map is one byte per block, so GET LBA STATUS and UNMAP behave
    like a thin-provisioned device with a granularity of one logical block.
    """

    unmap_reads_zero = True

    def __init__(self, size: int, block_size: int = 512, read_only: bool = False) -> None:
        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block size {block_size} not supported (use one of {SUPPORTED_BLOCK_SIZES})")
        if size <= 0 or size % block_size:
            raise ValueError(f"size {size} is not a positive multiple of the block size {block_size}")
        self.block_size = block_size
        self.read_only = read_only
        self._data = bytearray(size)
        self._mapped = bytearray(size // block_size)  # 1 = mapped, 0 = deallocated
        self.flushes = 0  # how many times flush() ran (tests check FUA/SYNC CACHE reach it)

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self._data[offset:offset + length])

    def read_into(self, offset: int, dest: memoryview) -> None:
        dest[:] = memoryview(self._data)[offset:offset + len(dest)]

    def _mark(self, offset: int, length: int, state: int) -> None:
        bs = self.block_size
        first = offset // bs
        last = -(-(offset + length) // bs)
        self._mapped[first:last] = bytes((state,)) * (last - first)

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        n = len(data)
        self._data[offset:offset + n] = data
        self._mark(offset, n, 1)
        if fua:
            self.flush()

    def flush(self) -> None:
        self.flushes += 1

    def unmap(self, offset: int, length: int) -> None:
        """Zero the range; only whole blocks become deallocated (partial ones stay mapped)."""
        if length <= 0:
            return
        self._data[offset:offset + length] = bytes(length)
        bs = self.block_size
        first = -(-offset // bs)
        last = (offset + length) // bs
        if last > first:
            self._mapped[first:last] = bytes(last - first)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def is_mapped(self, offset: int) -> tuple[bool, int]:
        bs = self.block_size
        first = offset // bs
        total = len(self._mapped)
        if first >= total:
            return (False, 0)
        state = self._mapped[first]
        other = b"\x00" if state else b"\x01"
        end = self._mapped.find(other, first)
        if end < 0:
            end = total
        return (bool(state), (end - first) * bs)

    def resize(self, new_size: int) -> None:
        if new_size <= 0 or new_size % self.block_size:
            raise ValueError(f"size {new_size} is not a positive multiple of the block size {self.block_size}")
        old = len(self._data)
        if new_size < old:
            del self._data[new_size:]
            del self._mapped[new_size // self.block_size:]
        else:
            self._data.extend(bytes(new_size - old))
            self._mapped.extend(bytes(new_size // self.block_size - len(self._mapped)))

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"RamBackstore(size={self.size}, block_size={self.block_size})"
