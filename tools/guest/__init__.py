"""A throw-away qemu guest running the Linux kernel initiator (open-iscsi) against a target.

- ``build.py``  builds and caches the guest kernel + initramfs (Debian kernel unpacked from its
  .deb, busybox-static, the host's open-iscsi/e2fsprogs binaries with their libraries);
- ``run.py``    makes a private network namespace, starts a target in it (ours or tgtd), boots
  the guest under TCG with a hard timeout and reads the step markers from its serial console;
- ``init.sh``   the guest's /init: the interop steps, one marker line per step;
- ``targets.py`` the targets as the harness starts them (several IQNs, CHAP, two portals);
- ``logincap.py`` records the login keys each side sent, from the namespace's loopback.

This machine's kernel has no iscsi_tcp, so the kernel initiator can only run in a guest.
"""
