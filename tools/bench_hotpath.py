"""Per-command CPU cost of the target's hot path, without sockets or a client.

Feeds encoded READ(16)/WRITE(16) command PDUs straight into a TargetConnection
whose transport only counts bytes, so the figure is the Python work per I/O
(parse → SCSI dispatch → backstore → response build) that a benchmark over TCP
hides behind syscalls and the client's own CPU.

    python -m tools.bench_hotpath [--ops 200000] [--profile] [--digests | --header-digest] [--only read|write]
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import struct
import tempfile
import time

from iscsi import keys as K
from iscsi import pdu as P
from iscsi.backstore.file import FileBackstore
from iscsi.framing import encode_bytes
from iscsi.scsi.lu import LogicalUnit
from iscsi.scsi.target import LunMap
from iscsi.target.connection import TargetConnection
from iscsi.target.server import IscsiServer
from tests.target.fakes import FakeRegistry, FakeTarget, StubTransport

IQN = "iqn.2026-11.org.sanstack:bench"


class CountingTransport(StubTransport):
    def __init__(self) -> None:
        self.bytes = 0

    def writelines(self, parts) -> None:
        for p in parts:
            self.bytes += len(p)



async def run(ops: int, write: bool, profile: bool, digests: bool = False, feed: int | None = None,
              header_digest: bool = False) -> None:
    """``digests``: CRC32C header and data digests; ``header_digest``: the header digest only."""
    header_digest = header_digest or digests
    with tempfile.TemporaryDirectory() as tmp:
        img = os.path.join(tmp, "lun.img")
        bs = FileBackstore(img, size=256 << 20, create=True)
        os.pwrite(bs.fd if hasattr(bs, "fd") else os.open(img, os.O_RDWR), b"\1" * (16 << 20), 0)
        lu = LogicalUnit(bs, serial="bench0001", lun_id=0)
        reg = FakeRegistry({IQN: FakeTarget(IQN, luns=LunMap({0: lu}))})
        server = IscsiServer(reg, nop_interval=3600)
        conn = TargetConnection(server)
        transport = CountingTransport()
        conn.connection_made(transport)
        login = P.LoginRequest(transit=True, csg=1, nsg=3, isid=0x400000000001, cmdsn=1, itt=1,
                               data=K.encode_text([("InitiatorName", "iqn.2026-11.org.x:y"),
                                                   ("TargetName", IQN), ("SessionType", "Normal"),
                                                   ("MaxRecvDataSegmentLength", "262144"),
                                                   ("ImmediateData", "Yes"), ("InitialR2T", "No")]
                                                  + ([("HeaderDigest", "CRC32C")] if header_digest else [])
                                                  + ([("DataDigest", "CRC32C")] if digests else [])))
        conn.data_received(encode_bytes(login))
        assert conn.session is not None
        assert (conn.header_digest, conn.data_digest) == (header_digest, digests), "digests not negotiated"
        wire = {"header_digest": header_digest, "data_digest": digests}
        # clear the power-on unit attention
        conn.data_received(encode_bytes(P.ScsiCommandPdu(cdb=b"\0" * 6, cmdsn=1, itt=2), **wire))
        await asyncio.sleep(0)
        batch = 32
        cmdsn = 2
        payload = b"\2" * 4096
        raws = []
        for i in range(ops):
            lba = (i * 7919) % 4096 * 8
            if write:
                cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, 8, 0, 0)
                pdu = P.ScsiCommandPdu(write=True, edtl=4096, cmdsn=cmdsn, itt=10 + i, cdb=cdb, data=payload)
            else:
                cdb = struct.pack(">BBQIBB", 0x88, 0, lba, 8, 0, 0)
                pdu = P.ScsiCommandPdu(read=True, edtl=4096, cmdsn=cmdsn, itt=10 + i, cdb=cdb)
            cmdsn += 1
            raws.append(encode_bytes(pdu, **wire))
        chunks = [b"".join(raws[i:i + batch]) for i in range(0, ops, batch)]
        if feed is not None:  # build ``ops`` commands, run the first ``feed``: an instruction count's
            chunks = chunks[:feed // batch]  # difference between two runs then leaves out the building
            ops = len(chunks) * batch
        prof = cProfile.Profile() if profile else None
        t0 = time.process_time()  # CPU time: the figure survives a busy machine
        if prof:
            prof.enable()
        for chunk in chunks:
            conn.data_received(chunk)
            conn._flush()
            await asyncio.sleep(0)
        if prof:
            prof.disable()
        dt = time.process_time() - t0
        print(f"{'write' if write else 'read'} 4K{' H+D digests' if digests else ' H digest' if header_digest else ''}: {ops} commands, {dt * 1e6 / ops:.2f} us/command "
              f"({ops / dt:,.0f} commands/s on one core), {transport.bytes >> 20} MiB out")
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=100000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--digests", action="store_true", help="negotiate CRC32C header and data digests")
    ap.add_argument("--header-digest", action="store_true", help="negotiate the CRC32C header digest only")
    ap.add_argument("--only", choices=("read", "write"), help="run one of the two (default: both)")
    ap.add_argument("--feed", type=int, help="build --ops commands but run only this many (for callgrind A/B)")
    args = ap.parse_args()
    for write in (False, True):
        if args.only and args.only != ("write" if write else "read"):
            continue
        asyncio.run(run(args.ops, write, args.profile, args.digests, args.feed, args.header_digest))


if __name__ == "__main__":
    main()
