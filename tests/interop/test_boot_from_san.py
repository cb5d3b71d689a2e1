"""qemu as an iSCSI client (its libiscsi block driver, ``-drive file=iscsi://...``): boot from SAN.

qemu-img writes an ext4 image with a busybox root onto the LUN; qemu boots the Debian kernel,
whose initramfs mounts /dev/vda (the LUN, as a virtio disk) and switch_roots to it; the root's
init checks a payload, writes a token, remounts / read-only and powers off. Afterwards the LUN's
image must be a clean ext4 holding the token and the data the guest wrote.
"""
import pytest

from . import harness

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("target", ["sanstack", "tgt"])
def test_qemu_boots_from_lun(target, tmp_path):
    harness.require(iscsi_block=True, tgt=(target == "tgt"))
    res = harness.run("--sanboot", "--target", target, workdir=tmp_path)
    assert res.returncode == 0, harness.explain(res, tmp_path)
    assert harness.step_outcomes(res.stdout) == {"9": "PASS"}, harness.explain(res, tmp_path)
    assert "the LUN's filesystem is clean and holds what the guest wrote" in res.stdout
    console = (tmp_path / "console.log").read_text(errors="replace")
    assert "/dev/vda / ext4 rw" in console and "/dev/vda / ext4 ro" in console
    assert "reboot: Power down" in console  # a clean power-off, not the harness's timeout
