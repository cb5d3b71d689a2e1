"""Writing a turn's output when some Data-In is still in the image file (zero-copy READs).

The connection normally hands its queued PDUs to the transport in one ``writelines``.
When the queue holds :class:`~iscsi.scsi.zerocopy.FileExtent` parts, the bytes around
them go to the socket with ``sendmsg`` and the extents with ``sendfile``, in order.  What
the socket does not take is handed back as a backlog, still as extents: the connection
sends it when the socket is writable again, and queues everything newer behind it (a copy
would cost the CPU that zero-copy saves, and a large READ at queue depth fills any socket).
The transport is only bypassed while it has nothing buffered; behind buffered transport
output everything is copied onto the transport instead.  The ranges are held unchanged by
the LU's fence, so a copy made late equals the one the READ would have made when it
executed.
"""
from __future__ import annotations

import errno
import logging
import os
import socket

from ..log import event
from ..scsi.zerocopy import FileExtent

_IOV_MAX = 1024  # Linux's limit on the parts of one writev
_MSG_MORE = socket.MSG_MORE
_os_sendfile = os.sendfile  # (module-level names: one lookup fewer per READ in send_parts)
# sendfile errors that mean "not from this file" rather than a broken socket or image.
_SENDFILE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
# sendfile errors that come from the socket side (the peer went away), not from the image.
_SOCKET_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNABORTED,
                            errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EBADF})

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


def _sendfile(fd: int, extent: FileExtent) -> tuple[int, bool]:
    """Send as much of ``extent`` as the socket takes now: (bytes sent, socket full).

    Short of the end and not full: the image ends early or its filesystem refused to splice;
    the caller copies the rest (FileExtent.read, which fails for an image cut short).
    """
    src = extent.source.fileno
    if src < 0:
        raise OSError("the image was closed before a READ's data was sent")
    offset, left = extent.offset, extent.length
    sent = 0
    while left:
        try:
            n = os.sendfile(fd, src, offset + sent, left)
        except BlockingIOError:
            return sent, True
        except OSError as err:
            if err.errno not in _SENDFILE_UNSUPPORTED:
                _maybe_image_failed(extent, err)
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
    return sent, False


def _maybe_image_failed(extent: FileExtent, err: OSError) -> None:
    """A sendfile failed for a reason other than the socket: the image could not be read (EIO
    from a failing disk).  The READ's GOOD status is already queued, so the connection must
    drop; zero-copy is turned off for this LU so that the initiator's retry is copied and
    gets its MEDIUM ERROR, instead of meeting the same page (and the same drop) forever."""
    if err.errno in _SOCKET_ERRNOS or not extent.fence.sendfile_ok:
        return
    extent.fence.sendfile_ok = False
    event(log, "zero_copy.image_read_failed", logging.ERROR, image=getattr(extent.source, "path", "?"),
          offset=extent.offset, errno=errno.errorcode.get(err.errno or 0, err.errno), error=err.strerror,
          consequence="connection dropped; READs of this LU are copied from now on")


def send_parts(sock: socket.socket, parts: list) -> list:
    """Send ``parts`` (bytes-like and FileExtents) in order until the socket is full;
    return what it did not take (a partly sent piece replaced by its rest), empty when
    all went.  Raises OSError if the socket or the image failed.

    The bytes before an extent go with MSG_MORE, so a PDU's header and its data leave in
    the same segments rather than a 48-byte packet of their own.  The usual turn is
    header, extent, header, extent...: a lone header goes with ``send`` and a whole extent
    with one ``sendfile``, without the general loops' lists and sums (per-READ path).
    """
    fd = sock.fileno()
    i, n = 0, len(parts)
    while i < n:
        part = parts[i]
        if part.__class__ is not FileExtent:
            j = i + 1
            while j < n and parts[j].__class__ is not FileExtent:
                j += 1
            if j == i + 1:  # one piece of bytes: a Data-In header
                try:
                    sent = sock.send(part, _MSG_MORE if j < n else 0)
                except BlockingIOError:
                    return parts[i:]
                if sent < len(part):
                    return [memoryview(part)[sent:], *parts[j:]]
            else:
                rest = _send(sock, parts[i:j], _MSG_MORE if j < n else 0)
                if rest:
                    return rest + parts[j:]
            i = j
            continue
        length = part.length
        src = part.source.fileno
        try:
            k = _os_sendfile(fd, src, part.offset, length) if src >= 0 else -1
        except BlockingIOError:
            return parts[i:]
        except OSError as err:
            if err.errno not in _SENDFILE_UNSUPPORTED:
                _maybe_image_failed(part, err)
                raise
            k = -1  # _sendfile meets the refusal again and falls back to a copy
        if k == length:  # the usual case: all of it at once
            i += 1
            continue
        if k > 0:  # a part went: the general path carries on from there
            part = parts[i] = FileExtent(part.source, part.offset + k, length - k, part.fence)
        sent, full = _sendfile(fd, part)
        if sent == part.length:
            i += 1
        elif full:  # the rest when the socket is writable again
            rest = FileExtent(part.source, part.offset + sent, part.length - sent, part.fence)
            return [rest, *parts[i + 1:]]
        else:
            parts[i] = part.read(sent)  # no splicing there: copy (an image cut short fails)
    return []


def write_out(sock: socket.socket, out: list, transport) -> list:
    """Write ``out`` (bytes-like parts and FileExtents) in order on ``sock`` (the
    transport's socket, duplicated); return what the socket did not take yet, for the
    caller to send once it is writable (empty when all went).  Raises OSError if the
    socket or the image failed (the connection cannot go on: a promised Data-In is lost).
    """
    if transport.get_write_buffer_size():
        # Bytes still queued on the transport go first: everything behind them is copied.
        transport.writelines([p.read() if p.__class__ is FileExtent else p for p in out])
        return []
    return send_parts(sock, out)
