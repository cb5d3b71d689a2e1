"""CRC32C digests: RFC 3720 Appendix B.4 vectors, fast vs reference, framing with digests."""
import os
import time

import pytest

from iscsi import pdu as P
from iscsi import digest
from iscsi.digest import HARDWARE, crc32c, crc32c_extend, crc32c_reference
from iscsi.framing import DataDigestFailure, HeaderDigestError, PduReader, encode_bytes

VECTORS = [
    (b"\x00" * 32, 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize("data,crc", VECTORS)
def test_rfc3720_vectors(data, crc):
    assert crc32c(data) == crc
    assert crc32c_reference(data) == crc


def test_fast_matches_reference_on_random_buffers_and_views():
    for n in (1, 3, 4, 511, 4096, 65537):
        buf = bytearray(os.urandom(n))
        assert crc32c(memoryview(buf)[1:]) == crc32c_reference(bytes(buf[1:]))
        assert crc32c_extend(crc32c(buf[: n // 2]), buf[n // 2:]) == crc32c_reference(bytes(buf))


def test_hardware_crc_in_use():
    assert HARDWARE  # the CI machines have SSE4.2; a silent fallback would hide a 100x slowdown


def test_fastest_native_crc_bound():
    # pyproject installs fastcrc (carry-less multiply folding), ~4x the CRC instruction on
    # large segments on x86 with PCLMULQDQ: the import-time timing must have kept it.
    assert digest.IMPLEMENTATION == "fastcrc"
    assert crc32c is digest._native()["fastcrc"]


@pytest.mark.parametrize("name", sorted(digest._native()))
def test_each_native_crc_matches_reference(name):
    fn = digest._native()[name]
    for n in (0, 1, 2, 3, 4, 15, 16, 47, 48, 63, 64, 255, 256, 1023, 4095, 4096, 8193, 65536, 131075):
        buf = bytearray(os.urandom(n + 7))
        for start in (0, 1, 3, 7):
            view = memoryview(buf)[start:start + n]
            ref = crc32c_reference(bytes(view))
            assert fn(view) == ref, (name, n, start)
            assert fn(bytes(view)) == ref and fn(view, 0) == ref
            cut = n // 3
            assert fn(view[cut:], fn(view[:cut])) == ref, (name, n, start, "continued")
            assert crc32c_reference(bytes(view[cut:]), crc32c_reference(bytes(view[:cut]))) == ref


def test_calibration_keeps_the_faster_implementation():
    slow_calls = []

    def slow(data, crc=0):
        slow_calls.append(len(data))
        time.sleep(0.002)
        return crc32c(data, crc)

    name, fn = digest._fastest({"slow": slow, "fast": crc32c})
    assert (name, fn) == ("fast", crc32c) and slow_calls  # both were timed
    assert digest._fastest({"only": slow}) == ("only", slow)
    assert digest._fastest({}) is None


def test_a_wrong_implementation_is_refused():
    assert not digest._agrees(lambda data, crc=0: crc32c(data, crc) ^ 1)
    assert not digest._agrees(lambda data, crc=0: crc32c(bytes(data)[:-1], crc))
    assert digest._agrees(crc32c)


def _stream(pdus, **kw):
    return b"".join(encode_bytes(p, **kw) for p in pdus)


def test_reader_with_digests_byte_by_byte():
    pdus = [P.NopOut(itt=1, data=b"abc"), P.ScsiCommandPdu(write=True, edtl=5, cdb=b"\x2a" + b"\0" * 9,
                                                           itt=2, data=b"hello")]
    raw = _stream(pdus, header_digest=True, data_digest=True)
    reader = PduReader(allowed=P.INITIATOR_OPCODES, header_digest=True, data_digest=True)
    out = []
    for i in range(len(raw)):
        out += reader.feed(raw[i:i + 1])
    assert [type(p) for p in out] == [P.NopOut, P.ScsiCommandPdu]
    assert bytes(out[1].data) == b"hello" and reader.buffered == 0


def test_bad_header_digest_raises():
    raw = bytearray(_stream([P.NopOut(itt=1)], header_digest=True))
    raw[48] ^= 1
    with pytest.raises(HeaderDigestError):
        PduReader(header_digest=True).feed(bytes(raw))


def test_residue_check_accepts_exactly_the_right_digest():
    """Digests are checked as crc32c(bytes + digest) == RESIDUE: every right digest passes,
    and any change to the bytes, the digest or its byte order fails."""
    for size in (0, 1, 48, 52, 4096):
        data = os.urandom(size)
        good = data + digest.pack_digest(crc32c(data))
        assert crc32c(good) == digest.RESIDUE == crc32c_reference(good)
        for bit in range(0, len(good) * 8, 7):
            bad = bytearray(good)
            bad[bit // 8] ^= 1 << (bit % 8)
            assert crc32c(bad) != digest.RESIDUE
        swapped = data + crc32c(data).to_bytes(4, "big")
        assert crc32c(data) == int.from_bytes(swapped[-4:], "little") or crc32c(swapped) != digest.RESIDUE


def test_bad_header_digest_in_a_later_pdu_raises():
    raw = bytearray(_stream([P.NopOut(itt=1, data=b"abc"), P.NopOut(itt=2)], header_digest=True))
    raw[-1] ^= 0x80  # the second PDU's header digest
    reader = PduReader(header_digest=True)
    with pytest.raises(HeaderDigestError):
        reader.feed(bytes(raw))


def test_bad_data_digest_reported_not_fatal():
    raw = bytearray(_stream([P.NopOut(itt=1, data=b"abcdef"), P.NopOut(itt=2)], data_digest=True))
    raw[50] ^= 0xFF  # inside the first data segment
    out = PduReader(data_digest=True).feed(bytes(raw))
    assert isinstance(out[0], DataDigestFailure) and isinstance(out[1], P.NopOut) and out[1].itt == 2


def test_data_segment_over_limit_refused():
    raw = encode_bytes(P.NopOut(itt=1, data=b"x" * 9000))
    with pytest.raises(P.PduFormatError):
        PduReader(max_data_segment=8192).feed(raw)
