"""Write the seed corpus of the fuzz targets: ``python -m tools.fuzz.seed [--out DIR]``.

Seeds are well-formed exchanges as real initiators send them (open-iscsi's key order,
CHAP one-way and mutual, discovery, long texts with the C bit, SCSI commands with immediate
data, Data-Out, digests), so mutation starts from deep inside the state machines rather than
from the first length check.  The output is deterministic: the files are checked in under
tests/fuzz/corpus/ and regenerating them changes nothing.
"""
from __future__ import annotations

import argparse
import struct
from pathlib import Path

from iscsi import keys as K
from iscsi import pdu as P
from iscsi.framing import encode_bytes
from tools.fuzz.targets import ALLOWED, CHAP_USER, MUTUAL_USER, READER_CONFIGS, TARGET

OUT = Path(__file__).resolve().parents[2] / "tests" / "fuzz" / "corpus"
INITIATOR = "iqn.2004-10.com.ubuntu:01:fuzzseed"
OPERATIONAL = [
    ("HeaderDigest", "None"), ("DataDigest", "None"), ("DefaultTime2Wait", "2"), ("DefaultTime2Retain", "0"),
    ("IFMarker", "No"), ("OFMarker", "No"), ("ErrorRecoveryLevel", "0"), ("InitialR2T", "No"),
    ("ImmediateData", "Yes"), ("MaxBurstLength", "16776192"), ("FirstBurstLength", "262144"),
    ("MaxOutstandingR2T", "1"), ("MaxConnections", "1"), ("DataPDUInOrder", "Yes"),
    ("DataSequenceInOrder", "Yes"), ("MaxRecvDataSegmentLength", "262144"),
]


def _rec(*, t: bool, c: bool = False, csg: int, nsg: int, text: bytes) -> bytes:
    flags = (0x80 if t else 0) | (0x40 if c else 0) | (csg << 4) | (nsg << 2)
    return bytes([flags]) + struct.pack(">H", len(text)) + text


def _kv(pairs) -> bytes:
    return K.encode_text(pairs)


def login_seeds() -> dict[str, bytes]:
    who = [("InitiatorName", INITIATOR), ("InitiatorAlias", "seed"), ("TargetName", TARGET),
           ("SessionType", "Normal")]
    seeds = {}
    # open target, straight to the operational stage (open-iscsi without CHAP)
    seeds["open-operational"] = bytes([0]) + _rec(t=True, csg=1, nsg=3, text=_kv(who + OPERATIONAL))
    # open target, AuthMethod=None security stage first (libiscsi)
    seeds["open-security-none"] = bytes([0]) + _rec(
        t=True, csg=0, nsg=1, text=_kv(who + [("AuthMethod", "None")])) + _rec(
        t=True, csg=1, nsg=3, text=_kv(OPERATIONAL))
    # one-way CHAP in three steps, then operational
    chap = (_rec(t=False, csg=0, nsg=1, text=_kv(who + [("AuthMethod", "CHAP,None")]))
            + _rec(t=False, csg=0, nsg=1, text=_kv([("CHAP_A", "7,6,5")]))
            + _rec(t=True, csg=0, nsg=1, text=_kv([("CHAP_N", CHAP_USER)]) + b"CHAP_R=@\0")
            + _rec(t=True, csg=1, nsg=3, text=_kv(OPERATIONAL)))
    seeds["chap-one-way"] = bytes([1]) + chap
    # mutual CHAP: the initiator's own challenge goes with CHAP_R
    mutual = (_rec(t=False, csg=0, nsg=1, text=_kv(who + [("AuthMethod", "CHAP")]))
              + _rec(t=False, csg=0, nsg=1, text=_kv([("CHAP_A", "5")]))
              + _rec(t=True, csg=0, nsg=1, text=_kv([("CHAP_N", CHAP_USER), ("CHAP_I", "77"),
                                                     ("CHAP_C", "0x" + "ab" * 16)]) + b"CHAP_R=@\0")
              + _rec(t=True, csg=1, nsg=3, text=_kv(OPERATIONAL)))
    seeds["chap-mutual"] = bytes([2]) + mutual
    seeds["chap-mutual-skip-operational"] = bytes([2]) + mutual[: -len(_rec(t=True, csg=1, nsg=3,
                                                                               text=_kv(OPERATIONAL)))]
    # ACL: one allowed, one refused
    acl_who = [("InitiatorName", ALLOWED), ("TargetName", TARGET)]
    seeds["acl-allowed"] = bytes([3]) + _rec(t=True, csg=1, nsg=3, text=_kv(acl_who + OPERATIONAL))
    seeds["acl-refused"] = bytes([3]) + _rec(t=True, csg=1, nsg=3, text=_kv(who + OPERATIONAL))
    # a target that requires header digests and no immediate data: the target offers keys
    offer_both = [(k, "CRC32C,None" if k == "HeaderDigest" else v) for k, v in OPERATIONAL]
    seeds["required-digest"] = bytes([4]) + _rec(t=False, csg=1, nsg=3, text=_kv(who + offer_both)) + _rec(
        t=True, csg=1, nsg=3, text=b"")
    # discovery, with and without CHAP
    disc = [("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("HeaderDigest", "None"),
            ("DataDigest", "None"), ("MaxRecvDataSegmentLength", "32768")]
    seeds["discovery"] = bytes([0]) + _rec(t=True, csg=1, nsg=3, text=_kv(disc))
    seeds["discovery-chap"] = bytes([5]) + (
        _rec(t=False, csg=0, nsg=1, text=_kv(disc[:2] + [("AuthMethod", "CHAP")]))
        + _rec(t=False, csg=0, nsg=1, text=_kv([("CHAP_A", "5")]))
        + _rec(t=True, csg=0, nsg=3, text=_kv([("CHAP_N", CHAP_USER)]) + b"CHAP_R=@\0"))
    # a long text in two PDUs with the C bit, a pair cut at the boundary
    text = _kv(who + OPERATIONAL + [("X-org.example.pad", "p" * 200)])
    seeds["continued-text"] = bytes([0]) + _rec(t=False, c=True, csg=1, nsg=3, text=text[:150]) + _rec(
        t=True, csg=1, nsg=3, text=text[150:])
    # a reflected CHAP challenge is impossible to seed (random), but CHAP_I/CHAP_C bad forms are
    seeds["chap-bad-forms"] = bytes([1]) + (
        _rec(t=False, csg=0, nsg=1, text=_kv(who + [("AuthMethod", "CHAP")]))
        + _rec(t=False, csg=0, nsg=1, text=_kv([("CHAP_A", "5")]))
        + _rec(t=True, csg=0, nsg=1, text=_kv([("CHAP_N", CHAP_USER), ("CHAP_R", "0bAAAA"),
                                               ("CHAP_I", "300"), ("CHAP_C", "0x")])))
    seeds["mutual-target-chap-only"] = bytes([2]) + (
        _rec(t=False, csg=0, nsg=1, text=_kv(who + [("AuthMethod", "CHAP")]))
        + _rec(t=False, csg=0, nsg=1, text=_kv([("CHAP_A", "5")]))
        + _rec(t=True, csg=0, nsg=1, text=_kv([("CHAP_N", MUTUAL_USER)]) + b"CHAP_R=@\0"))
    return seeds


def pdu_stream_seeds() -> dict[str, bytes]:
    def stream(config: int, step: int, pdus: list[P.Pdu]) -> bytes:
        hd, dd, _limit = READER_CONFIGS[config % len(READER_CONFIGS)]
        return bytes([config, step]) + b"".join(encode_bytes(p, header_digest=hd, data_digest=dd) for p in pdus)

    who = [("InitiatorName", INITIATOR), ("TargetName", TARGET)] + OPERATIONAL
    login = P.LoginRequest(transit=True, csg=1, nsg=3, isid=0x400000000001, itt=1, cmdsn=1, data=_kv(who))
    write = P.ScsiCommandPdu(write=True, edtl=8192, cmdsn=1, itt=2, final=False,
                             cdb=bytes.fromhex("2a000000000000001000") + bytes(6), data=bytes(range(256)) * 4)
    dout = P.DataOut(itt=2, ttt=P.RESERVED_TAG, datasn=0, offset=1024, final=True, data=b"\xa5" * 7168)
    read = P.ScsiCommandPdu(read=True, edtl=4096, cmdsn=2, itt=3, cdb=bytes.fromhex("28000000000000000800") + bytes(6))
    long_cdb = P.ScsiCommandPdu(read=True, edtl=512, cmdsn=3, itt=4, cdb=bytes(range(32)))
    bidi = P.ScsiCommandPdu(read=True, write=True, edtl=512, cmdsn=4, itt=5, cdb=bytes(16), bidi_read_length=512)
    nop = P.NopOut(itt=6, cmdsn=5, immediate=True, data=b"ping")
    text = P.TextRequest(itt=7, cmdsn=5, data=_kv([("SendTargets", "All")]))
    tmf = P.TaskMgmtRequest(function=1, rtt=2, itt=8, cmdsn=6, immediate=True)
    snack = P.SnackRequest(type=0, itt=9, begrun=0, runlength=0)
    logout = P.LogoutRequest(reason=0, itt=10, cmdsn=6, immediate=True)
    ffp = [write, dout, read, long_cdb, bidi, nop, text, tmf, snack, logout]
    seeds = {
        "login": stream(0, 13, [login]),
        "ffp-plain": stream(0, 96, ffp),
        "ffp-header-digest": stream(1, 47, ffp),
        "ffp-both-digests": stream(2, 48, ffp),
        "ffp-small-segments": stream(3, 1, [nop, read, text, logout]),
        "data-over-limit": stream(3, 60, [P.DataOut(itt=2, data=bytes(1024))]),
    }
    # With a raw lane attached (config + 4): commands it takes (even ITT) and declines (odd)
    # behind and between other PDUs, in one read (step byte 255) and in small reads.
    def cmd(itt: int, **kw) -> P.ScsiCommandPdu:
        return P.ScsiCommandPdu(cmdsn=itt, itt=itt, cdb=bytes.fromhex("28000000000000000800") + bytes(6), **kw)

    lane = [cmd(20, read=True, edtl=4096), nop, cmd(22, read=True, edtl=4096), cmd(23, read=True, edtl=4096),
            cmd(24, write=True, edtl=1024, data=bytes(range(256)) * 4), text, cmd(26, read=True, edtl=512),
            dout, cmd(27, write=True, edtl=3, data=b"abc"), cmd(28, read=True, edtl=512)]
    seeds["lane-one-read"] = stream(4, 255, lane)
    seeds["lane-both-digests"] = stream(6, 255, lane)
    seeds["lane-header-digest-small-reads"] = stream(5, 70, lane)
    bad_digest = bytearray(seeds["ffp-both-digests"])
    bad_digest[-5] ^= 0xFF  # the last data digest
    seeds["bad-data-digest"] = bytes(bad_digest)
    return seeds


def write(out: Path = OUT) -> dict[str, int]:
    counts = {}
    for target, seeds in (("login", login_seeds()), ("pdu_stream", pdu_stream_seeds())):
        d = out / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (d / f"seed-{name}").write_bytes(data)
        counts[target] = len(seeds)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the fuzz seed corpus.")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    for target, n in write(args.out).items():
        print(f"{target}: {n} seeds in {args.out / target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
