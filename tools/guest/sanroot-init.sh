#!/bin/sh
# /sbin/init of the boot-from-SAN root filesystem (busybox). The kernel booted by qemu found this
# filesystem on /dev/vda, a virtio disk that qemu reads from an iSCSI LUN (-drive file=iscsi://).
# It proves the root is the LUN, reads a payload written before boot, writes a token the host
# checks afterwards, and shuts down cleanly (root remounted read-only, then power off).
export PATH=/bin:/sbin
M="@@SANSTACK"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
fail() { echo "$M STEP 9 boot-from-san FAIL $*"; sync; echo "$M RESULT FAIL"; poweroff -f; }
echo "$M INFO init from the LUN: $(grep ' / ' /proc/mounts | tr '\n' ';')"
grep -q '^/dev/vda / ext4 rw' /proc/mounts || fail "root is not /dev/vda (ext4, rw)"
[ "$(md5sum /etc/payload | cut -d' ' -f1)" = "$(cat /etc/payload.md5)" ] || fail "payload read back differs"
token=$(sed -n 's/.*sanstack\.token=\([0-9a-f]*\).*/\1/p' /proc/cmdline)
[ -n "$token" ] || fail "no sanstack.token on the kernel command line"
mkdir -p /var/lib
echo "$token" >/var/lib/booted || fail "cannot write to the root filesystem"
dd if=/dev/urandom of=/var/lib/written bs=1k count=512 2>/dev/null
md5sum /var/lib/written | cut -d' ' -f1 >/var/lib/written.md5
sync
mount -o remount,ro / || fail "cannot remount / read-only"
echo "$M INFO root remounted read-only: $(grep ' / ' /proc/mounts | tr '\n' ';')"
echo "$M STEP 9 boot-from-san PASS"
echo "$M RESULT PASS"
poweroff -f
