"""Writing a turn's output when some Data-In is still in the image file (zero-copy READs).

The connection normally hands its queued PDUs to the transport in one ``writelines``.
When the queue holds :class:`~iscsi.scsi.zerocopy.FileExtent` parts, the bytes around
them go to the socket with ``sendmsg`` and the extents with ``sendfile``, in order — but
only while the transport has nothing buffered (its buffer would otherwise be written
after ours).  As soon as the socket is full, everything left is copied (``pread``) and
queued on the transport, which then takes care of back-pressure as usual.  The ranges
are held unchanged by the LU's fence, so a copy made now equals the one the READ would
have made when it executed.
"""
from __future__ import annotations

import errno
import logging
import os
import socket

from ..log import event
from ..scsi.zerocopy import FileExtent

_IOV_MAX = 1024  # Linux's limit on the parts of one writev
# sendfile errors that mean "not from this file" rather than a broken socket or image.
_SENDFILE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})

log = logging.getLogger(__name__)


def _send(sock: socket.socket, parts: list, flags: int) -> list:
    """Send ``parts`` on the non-blocking socket; return what it did not take."""
    left = parts
    while left:
        chunk = left[:_IOV_MAX]
        try:
            n = sock.sendmsg(chunk, (), flags)
        except BlockingIOError:
            return left
        if n == sum(map(len, chunk)):  # the usual case: all of it
            left = left[_IOV_MAX:]
            continue
        for i, part in enumerate(chunk):
            size = len(part)
            if n < size:
                return [memoryview(part)[n:] if n else part, *left[i + 1:]]
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
        except OSError as err:
            if err.errno not in _SENDFILE_UNSUPPORTED:
                raise
            # The image's filesystem cannot splice: copy this one, and hold no more READs there.
            extent.fence.sendfile_ok = False
            event(log, "zero_copy.sendfile_refused", logging.WARNING,
                  image=getattr(extent.source, "path", "?"), why=err.strerror)
            break
        if not n:
            break
        sent += n
        left -= n
    return sent


def write_out(sock: socket.socket, out: list, transport) -> None:
    """Write ``out`` (bytes-like parts and FileExtents) in order on ``sock`` (the
    transport's socket, duplicated); raises OSError if the socket or the image failed (the
    connection cannot go on: a promised Data-In is lost).

    The bytes before an extent go with MSG_MORE, so a PDU's header and its data leave in
    the same segments rather than a 48-byte packet of their own.
    """
    direct = transport.get_write_buffer_size() == 0
    fd = sock.fileno()
    iov: list = []  # bytes for the socket, in order, before the next extent
    rest: list = []  # everything after the socket filled up: copied, for the transport
    for part in out:
        if part.__class__ is not FileExtent:
            (iov if direct else rest).append(part)
            continue
        if direct and iov:
            rest = _send(sock, iov, socket.MSG_MORE)
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
        rest = _send(sock, iov, 0)
    if rest:
        transport.writelines(rest)
