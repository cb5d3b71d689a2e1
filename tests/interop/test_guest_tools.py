"""The interop harness's own pieces, without qemu: cpio writer, module order, .modinfo reader,
login capture, console marker parsing."""
import io
import stat
import struct
from pathlib import Path

import pytest

from tools.guest import build
from tools.guest.logincap import LoginCapture
from tools.guest.run import Guest, GuestResult, summarize


# ------------------------------------------------------------------ cpio


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, (rdevmajor, rdevminor)); asserts the newc layout rules."""
    out, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize, mode = fields[11], fields[6], fields[1]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        assert data[pos + 110 + namesize - 1] == 0
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos:pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body, (fields[9], fields[10]))


def test_cpio_holds_dirs_files_links_and_device_nodes():
    c = build.Cpio()
    c.file("usr/bin/tool", b"abcde", 0o755)
    c.symlink("bin", "usr/bin")
    c.chardev("dev/console", 5, 1)
    c.file("usr/bin/tool", b"again")  # a second entry of one name is ignored
    raw = c.finish()
    assert len(raw) % 512 == 0
    entries = read_newc(raw)
    assert stat.S_ISDIR(entries["usr"][0]) and stat.S_ISDIR(entries["usr/bin"][0])
    mode, body, _ = entries["usr/bin/tool"]
    assert stat.S_ISREG(mode) and mode & 0o777 == 0o755 and body == b"abcde"
    assert stat.S_ISLNK(entries["bin"][0]) and entries["bin"][1] == b"usr/bin"
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2] == (5, 1)
    assert list(entries).index("dev") < list(entries).index("dev/console")  # parents first


# ------------------------------------------------------------------ modules


def fake_ko(path: Path, modinfo: dict[str, str]) -> Path:
    """A minimal ELF64 LE file with a .modinfo and a .shstrtab section."""
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in modinfo.items())
    shstr = b"\0.modinfo\0.shstrtab\0"
    info_off = 64
    shstr_off = info_off + len(info)
    shoff = (shstr_off + len(shstr) + 7) & ~7
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    hdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    sh = struct.Struct("<IIQQQQIIQQ")
    sections = sh.pack(*[0] * 10) + sh.pack(1, 1, 0, 0, info_off, len(info), 0, 0, 1, 0) \
        + sh.pack(10, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0)
    body = hdr + info + shstr
    path.write_bytes(body + bytes(shoff - len(body)) + sections)
    return path


def test_modinfo_reads_depends(tmp_path):
    ko = fake_ko(tmp_path / "iscsi_tcp.ko", {"license": "GPL", "depends": "libiscsi,libiscsi_tcp"})
    info = build.modinfo(ko)
    assert info["depends"] == ["libiscsi,libiscsi_tcp"]
    assert info["license"] == ["GPL"]


def test_load_order_puts_dependencies_first_and_skips_builtins(tmp_path):
    deps = {"iscsi_tcp": "libiscsi,libiscsi_tcp", "libiscsi_tcp": "libiscsi",
            "libiscsi": "scsi_transport_iscsi,scsi_mod", "scsi_transport_iscsi": "scsi_mod",
            "scsi_mod": "scsi_common", "scsi_common": "", "crc_t10dif": "crc-core"}
    index = {n: fake_ko(tmp_path / f"{n}.ko", {"depends": d}) for n, d in deps.items()}
    order = build.load_order(["iscsi_tcp", "crc_t10dif"], index, builtin={"crc_core"})
    assert sorted(order) == sorted(deps)
    for name, d in deps.items():
        for dep in filter(None, d.replace("-", "_").split(",")):
            if dep != "crc_core":
                assert order.index(dep) < order.index(name), (dep, name)


def test_load_order_reports_missing_and_cycles(tmp_path):
    index = {"a": fake_ko(tmp_path / "a.ko", {"depends": "b"}), "b": fake_ko(tmp_path / "b.ko", {"depends": "a"}),
             "c": fake_ko(tmp_path / "c.ko", {"depends": "nowhere"})}
    with pytest.raises(build.BuildError, match="cycle"):
        build.load_order(["a"], index, set())
    with pytest.raises(build.BuildError, match="nowhere"):
        build.load_order(["c"], index, set())


def test_usr_merge_paths():
    assert build._usr_path("/lib/x86_64-linux-gnu/libc.so.6") == "/usr/lib/x86_64-linux-gnu/libc.so.6"
    assert build._usr_path("/lib64/ld-linux-x86-64.so.2") == "/usr/lib64/ld-linux-x86-64.so.2"
    assert build._usr_path("/usr/sbin/iscsid") == "/usr/sbin/iscsid"


# ------------------------------------------------------------------ login capture


def frame(sport: int, dport: int, seq: int, payload: bytes = b"", syn: bool = False) -> bytes:
    eth = bytes(12) + b"\x08\x00"
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02 if syn else 0x18, 65535, 0, 0)
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 6, 0, b"\x7f\0\0\1", b"\x7f\0\0\1")
    return eth + ip + tcp + payload


def pdu(opcode: int, flags: int, keys: list[str], status: int = 0) -> bytes:
    data = b"".join(k.encode() + b"\0" for k in keys)
    bhs = bytearray(48)
    bhs[0], bhs[1] = opcode, flags
    bhs[5:8] = len(data).to_bytes(3, "big")
    bhs[36:38] = status.to_bytes(2, "big")
    return bytes(bhs) + data + bytes(-len(data) % 4)


def test_login_capture_follows_a_login_split_across_segments():
    cap = LoginCapture({3260})
    req = pdu(0x43, 0x87, ["InitiatorName=iqn.x:i", "HeaderDigest=None"])  # T=1 CSG=1 NSG=3
    rsp = pdu(0x23, 0x87, ["TargetPortalGroupTag=1", "HeaderDigest=None"], status=0)
    cap._packet(frame(40000, 3260, 99, syn=True))
    cap._packet(frame(3260, 40000, 499, syn=True))
    cap._packet(frame(40000, 3260, 100, req[:30]))
    cap._packet(frame(40000, 3260, 130, req[30:]))
    cap._packet(frame(3260, 40000, 500, rsp))
    cap._packet(frame(40000, 3260, 100 + len(req), pdu(0x01, 0x80, [])))  # SCSI command: login over
    cap._packet(frame(3260, 40000, 500 + len(rsp), pdu(0x23, 0x80, ["Late=1"])))
    (flow,) = cap.flows
    assert [p.direction for p in flow.pdus] == ["initiator", "target"]
    assert flow.pdus[0].keys == ["InitiatorName=iqn.x:i", "HeaderDigest=None"]
    assert (flow.pdus[0].csg, flow.pdus[0].nsg, flow.pdus[0].transit) == (1, 3, True)
    assert flow.pdus[1].keys[0] == "TargetPortalGroupTag=1" and flow.pdus[1].status == 0
    text = cap.report()
    assert "Login Request [operational -> full-feature]" in text and "Late=1" not in text


def test_login_capture_ignores_other_ports_and_stops_at_a_gap():
    cap = LoginCapture({3260})
    cap._packet(frame(40001, 9999, 1, syn=True))
    cap._packet(frame(40002, 3260, 1, syn=True))
    cap._packet(frame(40002, 3260, 50, pdu(0x43, 0x87, ["A=1"])))  # seq jumps: not followed
    assert len(cap.flows) == 1 and cap.flows[0].pdus == [] and cap.flows[0].done


# ------------------------------------------------------------------ console markers


class FakeProc:
    def __init__(self) -> None:
        self.stdin = io.BytesIO()


def guest(on_request=None) -> Guest:
    img = build.GuestImage(Path("k"), Path("i"), "v", "key", (), Path("bb"))
    g = Guest(img, "console=ttyS0", Path("/dev/null"), [], on_request, echo=False)
    g.proc = FakeProc()
    return g


def test_markers_steps_blocks_and_result():
    g = guest()
    for line in ["[    1.0] noise", "@@SANSTACK STEP 1 discovery-login BEGIN",
                 "[   2.1] sd 0:0:0:0: x @@SANSTACK STEP 1 discovery-login PASS (1s)",
                 "@@SANSTACK STEP 5a chap-oneway FAIL 'iscsiadm' exited 24: auth",
                 "@@SANSTACK BEGIN-SESSION-INFO plain", "HeaderDigest: None", "@@SANSTACK END-SESSION-INFO plain",
                 "@@SANSTACK STEP 7 target-restart BEGIN", "@@SANSTACK RESULT FAIL"]:
        g._line(line)
    r = g.res
    assert r.steps["1"] == ["discovery-login", "PASS", "(1s)"]
    assert r.steps["5a"][1:] == ["FAIL", "'iscsiadm' exited 24: auth"]
    assert r.blocks["session-info plain"] == ["HeaderDigest: None"]
    ok, lines = summarize(r, ["1", "5a", "7", "8"])
    assert not ok
    text = "\n".join(lines)
    assert "HUNG" in text and "NOT RUN" in text and "PASS (1s)" in text


def test_request_lines_are_answered_on_the_console_input():
    seen = []
    g = guest(lambda action: seen.append(action) or "ok")
    g._line("@@SANSTACK REQ 3 stop-target")
    assert seen == ["stop-target"]
    assert g.proc.stdin.getvalue() == b"ACK 3 ok\n"
    g2 = guest(lambda action: 1 / 0)
    g2._line("@@SANSTACK REQ 1 start-target")
    assert g2.proc.stdin.getvalue().startswith(b"ACK 1 error:ZeroDivisionError")


def test_all_pass_needs_the_guest_result_too():
    r = GuestResult(steps={"1": ["x", "PASS", ""]}, result=None)
    assert summarize(r, ["1"])[0] is False
    r.result = "PASS"
    assert summarize(r, ["1"])[0] is True
    r.timed_out = True
    assert summarize(r, ["1"])[0] is False
