"""Writing a turn's output when some Data-In is still in the image file (zero-copy READs).

The connection normally hands its queued PDUs to the transport in one ``writelines``.
When the queue holds :class:`~iscsi.scsi.zerocopy.FileExtent` parts, the bytes around
them go to the socket with ``writev`` and the extents with ``sendfile``, in order — but
only while the transport has nothing buffered (its buffer would otherwise be written
after ours).  As soon as the socket is full, everything left is copied (``pread``) and
queued on the transport, which then takes care of back-pressure as usual.  The ranges
are held unchanged by the LU's fence, so a copy made now equals the one the READ would
have made when it executed.
"""
from __future__ import annotations

import os

from ..scsi.zerocopy import FileExtent

_IOV_MAX = 1024  # Linux's limit on the parts of one writev


def _writev(fd: int, parts: list) -> list:
    """Write ``parts`` to the non-blocking socket; return what it did not take."""
    for first in range(0, len(parts), _IOV_MAX):
        chunk = parts[first:first + _IOV_MAX]
        try:
            n = os.writev(fd, chunk)
        except BlockingIOError:
            n = 0
        for i, part in enumerate(chunk):
            size = len(part)
            if n < size:
                head = memoryview(part)[n:] if n else part
                return [head, *chunk[i + 1:], *parts[first + _IOV_MAX:]]
            n -= size
    return []


def _sendfile(fd: int, extent: FileExtent) -> int:
    """Send as much of ``extent`` as the socket takes now (0 at the image's end)."""
    src = extent.source.fileno
    if src < 0:
        raise OSError("the image was closed before a READ's data was sent")
    offset, left = extent.offset, extent.length
    sent = 0
    while left:
        try:
            n = os.sendfile(fd, src, offset + sent, left)
        except BlockingIOError:
            break
        if not n:
            break
        sent += n
        left -= n
    return sent


def write_out(fd: int, out: list, transport) -> None:
    """Write ``out`` (bytes-like parts and FileExtents) in order; raises OSError if the
    socket or the image failed (the connection cannot go on: a promised Data-In is lost)."""
    direct = transport.get_write_buffer_size() == 0
    iov: list = []  # bytes for the socket, in order, before the next extent
    rest: list = []  # everything after the socket filled up: copied, for the transport
    for part in out:
        if part.__class__ is not FileExtent:
            (iov if direct else rest).append(part)
            continue
        if direct and iov:
            rest = _writev(fd, iov)
            iov = []
            direct = not rest
        if direct:
            sent = _sendfile(fd, part)
            if sent < part.length:
                direct = False
                rest.append(part.read(sent))
        else:
            rest.append(part.read())
    if iov:
        rest = _writev(fd, iov)
    if rest:
        transport.writelines(rest)
