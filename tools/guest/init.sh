#!/bin/busybox sh
# /init of the interop guest (busybox ash). Runs the open-iscsi interop steps against the target
# the host started, printing one marker line per step on the serial console:
#
#   @@SANSTACK STEP <id> <name> BEGIN | PASS | FAIL <why> | SKIP <why>
#   @@SANSTACK INFO <text>           @@SANSTACK RESULT PASS|FAIL
#   @@SANSTACK REQ <n> <action>      the host answers "ACK <n> <status>" on the console's input
#
# Parameters come from the kernel command line as sanstack.KEY=VALUE (see tools/guest/run.py).
# sanstack.mode=sanboot instead mounts /dev/vda (a qemu iscsi:// drive) and switch_roots to it.

export PATH=/usr/sbin:/usr/bin:/bb
/usr/bin/busybox --install -s /bb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/lock/iscsi /var/lock/iscsi /etc/iscsi/nodes /etc/iscsi/send_targets /etc/iscsi/ifaces
ln -sf /proc/mounts /etc/mtab
exec </dev/console >/dev/console 2>&1

M="@@SANSTACK"
FAILED=0
REQN=0

# ---------------------------------------------------------------- parameters (kernel cmdline)
for w in $(cat /proc/cmdline); do
    case "$w" in
        sanstack.*=*)
            k=${w%%=*}; k=${k#sanstack.}; v=${w#*=}
            case "$k" in *[!a-z0-9_]*) continue ;; esac
            eval "CFG_$k=\$v" ;;
    esac
done
HOST=${CFG_host:-10.0.2.2}
PORT=${CFG_port:-3260}
TPGT=${CFG_tpgt:-1}
IQN=${CFG_iqn}
LUN=${CFG_lun:-0}
INAME=${CFG_initiator:-iqn.2026-11.org.sanstack:guest}

info() { echo "$M INFO $*"; }
halt() {
    sync
    echo "$M RESULT $1"
    poweroff -f
    sleep 5
    echo o >/proc/sysrq-trigger
}

# ---------------------------------------------------------------- modules and network
for m in $(cat /lib/modules/load.order); do
    insmod /lib/modules/$m.ko 2>/tmp/insmod.err || { grep -q "File exists" /tmp/insmod.err || { info "insmod $m failed: $(cat /tmp/insmod.err)"; }; }
done
info "kernel $(uname -r) modules $(wc -l </lib/modules/load.order) loaded"

# ---------------------------------------------------------------- boot from SAN
if [ "$CFG_mode" = sanboot ]; then
    n=0
    while [ ! -b /dev/vda ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n + 1)); done
    [ -b /dev/vda ] || { echo "$M STEP 9 sanboot FAIL no /dev/vda"; halt FAIL; }
    mount -t ext4 /dev/vda /newroot || { echo "$M STEP 9 sanboot FAIL mount /dev/vda"; halt FAIL; }
    [ -x /newroot/sbin/init ] || { echo "$M STEP 9 sanboot FAIL no /sbin/init on the LUN"; halt FAIL; }
    info "root filesystem on /dev/vda mounted; switch_root"
    mount --move /dev /newroot/dev
    umount /proc /sys /tmp /run
    exec switch_root -c /dev/console /newroot /sbin/init
fi

ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
# No default route: the guest reaches only slirp's 10.0.2.0/24 (10.0.2.2 = the namespace's lo).

# ---------------------------------------------------------------- helpers
FAILMSG=""
# run CMD...: run with stdin closed, show the output, remember a failure message.
run() {
    echo "+ $*"
    "$@" </dev/null >/tmp/out 2>&1
    rc=$?
    tail -n 40 /tmp/out
    [ $rc -eq 0 ] && return 0
    FAILMSG="'$*' exited $rc: $(tail -n 2 /tmp/out | tr '\n' ' ')"
    return 1
}
fail() { FAILMSG="$*"; return 1; }

# step ID NAME FUNCTION: one marker at the start and one with the outcome.
step() {
    id=$1; name=$2; fn=$3
    echo "$M STEP $id $name BEGIN"
    FAILMSG=""
    t0=$(cut -d. -f1 /proc/uptime)
    if $fn; then
        echo "$M STEP $id $name PASS ($(( $(cut -d. -f1 /proc/uptime) - t0 ))s)"
    else
        echo "$M STEP $id $name FAIL ${FAILMSG:-no reason given}"
        FAILED=1
    fi
}

# request ACTION: ask the host to act (restart the target...) and wait for its ACK.
request() {
    REQN=$((REQN + 1))
    echo "$M REQ $REQN $1"
    while read -r -t 180 a b c; do
        if [ "$a" = ACK ] && [ "$b" = "$REQN" ]; then
            [ "$c" = ok ] && return 0
            fail "host could not $1: $c"; return 1
        fi
    done
    fail "no answer from the host to '$1'"
    return 1
}

start_iscsid() {
    iscsid -f -n >>/tmp/iscsid.log 2>&1 &
    ISCSID_PID=$!
    n=0
    while ! grep -q ISCSIADM_ABSTRACT_NAMESPACE /proc/net/unix; do
        n=$((n + 1)); [ $n -gt 100 ] && { fail "iscsid did not open its control socket"; return 1; }
        sleep 0.1
    done
    return 0
}

stop_iscsid() {
    kill $ISCSID_PID 2>/dev/null
    n=0
    while grep -q ISCSIADM_ABSTRACT_NAMESPACE /proc/net/unix; do
        n=$((n + 1)); [ $n -gt 100 ] && { fail "iscsid did not exit"; return 1; }
        sleep 0.1
    done
    wait $ISCSID_PID 2>/dev/null
    return 0
}

# node_new IQN PORT TPGT [KEY VALUE]...: a fresh node record for HOST:PORT,TPGT.
node_new() {
    _iqn=$1; _p=$2; _t=$3; shift 3
    iscsiadm -m node -o delete -T "$_iqn" -p "$HOST:$_p" >/dev/null 2>&1
    run iscsiadm -m node -o new -T "$_iqn" -p "$HOST:$_p,$_t" || return 1
    while [ $# -ge 2 ]; do
        run iscsiadm -m node -o update -T "$_iqn" -p "$HOST:$_p" -n "$1" -v "$2" || return 1
        shift 2
    done
}

# session_id IQN PORT -> the kernel's session number (empty if none)
session_id() {
    iscsiadm -m session 2>/dev/null | grep " $HOST:$2,[0-9]* $1 " | sed -n 's/^[a-z]*: \[\([0-9]*\)\].*/\1/p' | head -n 1
}

# wait_disk SID LUN -> sdX of that LUN of that session (waits up to 30 s)
wait_disk() {
    n=0
    while [ $n -lt 300 ]; do
        for b in /sys/class/iscsi_session/session$1/device/target*/*:*:*:$2/block/*; do
            if [ -e "$b" ]; then
                d=${b##*/}
                [ -b /dev/$d ] && { echo "$d"; return 0; }
            fi
        done
        sleep 0.1; n=$((n + 1))
    done
    return 1
}

# login IQN PORT -> sets SID and DISK
login() {
    run iscsiadm -m node -T "$1" -p "$HOST:$2" --login || return 1
    SID=$(session_id "$1" "$2")
    [ -n "$SID" ] || { fail "no session listed after login to $1 via $2"; return 1; }
    DISK=$(wait_disk "$SID" "$LUN") || { fail "no disk for LUN $LUN of session $SID"; return 1; }
    info "session $SID to $1 via $HOST:$2: disk $DISK ($(cat /sys/block/$DISK/size) sectors)"
}

# logout IQN PORT SID DISK: and check that the session and the disk are gone
logout() {
    run iscsiadm -m node -T "$1" -p "$HOST:$2" --logout || return 1
    n=0
    while [ -e /sys/class/iscsi_session/session$3 ] || [ -e /sys/block/$4 ]; do
        n=$((n + 1)); [ $n -gt 100 ] && { fail "session $3 or disk $4 still present after logout"; return 1; }
        sleep 0.1
    done
}

# fresh: no session, no node record, so a step does not inherit what an earlier one left behind.
fresh() {
    iscsiadm -m session -u </dev/null >/dev/null 2>&1
    iscsiadm -m node -o delete </dev/null >/dev/null 2>&1
    n=0
    while [ -n "$(ls /sys/class/iscsi_session 2>/dev/null)" ]; do
        n=$((n + 1)); [ $n -gt 100 ] && { fail "sessions left over: $(ls /sys/class/iscsi_session)"; return 1; }
        sleep 0.1
    done
}

session_info() {
    echo "$M BEGIN-SESSION-INFO $1"
    iscsiadm -m session -r "$2" -P 3 2>&1 | grep -v "^\s*$"
    echo "$M END-SESSION-INFO $1"
}

md5() { md5sum "$@" | cut -d' ' -f1; }

# check_rw DISK MIB_OFFSET MIB: O_DIRECT write of random data, read back (direct), compare
check_rw() {
    run dd if=/dev/urandom of=/tmp/rw.dat bs=1M count=$3 || return 1
    run dd if=/tmp/rw.dat of=/dev/$1 bs=1M seek=$2 oflag=direct conv=notrunc || return 1
    dd if=/dev/$1 of=/tmp/rw.back bs=1M skip=$2 count=$3 iflag=direct 2>/dev/null
    [ "$(md5 /tmp/rw.dat)" = "$(md5 /tmp/rw.back)" ] || { fail "data read back from $1 differs"; return 1; }
    rm -f /tmp/rw.dat /tmp/rw.back
}

# ---------------------------------------------------------------- step 1-4: plain target
s_discovery() {
    run iscsiadm -m discovery -t sendtargets -p "$HOST:$PORT" || return 1
    grep -q ":$PORT,$TPGT $IQN\$" /tmp/out || { fail "SendTargets lists no '...:$PORT,$TPGT $IQN'"; return 1; }
    # The reply advertises the target's own address (127.0.0.1 in its namespace), which the guest
    # cannot reach: drop the records discovery made and add one for the slirp alias instead.
    iscsiadm -m node -o delete -T "$IQN" >/dev/null 2>&1
    node_new "$IQN" "$PORT" "$TPGT" || return 1
    login "$IQN" "$PORT" || return 1
    t=$(cat /sys/class/iscsi_session/session$SID/tpgt)
    [ "$t" = "$TPGT" ] || { fail "session TPGT $t, expected $TPGT"; return 1; }
    session_info plain "$SID"
    PLAIN_SID=$SID; PLAIN_DISK=$DISK
}

s_io() {
    [ -n "$PLAIN_DISK" ] || { fail "no disk (step 1 failed)"; return 1; }
    d=$PLAIN_DISK
    mib=$(( $(cat /sys/block/$d/size) / 2048 ))
    [ $mib -ge 8 ] || { fail "LUN too small ($mib MiB)"; return 1; }
    # Each region: 1 MiB written with O_DIRECT then 1 MiB buffered (64 KiB writes, fsync);
    # the end region stops short of the last MiB, whose last sector is written alone below.
    for r in 0 $((mib / 2)) $((mib - 3)); do
        dd if=/dev/urandom of=/tmp/d$r bs=1M count=1 2>/dev/null
        dd if=/dev/urandom of=/tmp/b$r bs=1M count=1 2>/dev/null
        run dd if=/tmp/d$r of=/dev/$d bs=1M seek=$r oflag=direct conv=notrunc || return 1
        run dd if=/tmp/b$r of=/dev/$d bs=64k seek=$(( (r + 1) * 16 )) conv=notrunc,fsync || return 1
    done
    # The last sector alone (end-of-LUN boundary), O_DIRECT.
    last=$(( $(cat /sys/block/$d/size) - 1 ))
    dd if=/dev/urandom of=/tmp/last bs=512 count=1 2>/dev/null
    run dd if=/tmp/last of=/dev/$d bs=512 seek=$last oflag=direct conv=notrunc || return 1
    sync
    echo 3 >/proc/sys/vm/drop_caches
    for r in 0 $((mib / 2)) $((mib - 3)); do
        # Read each half both ways: direct and through the (dropped) page cache.
        a=$(dd if=/dev/$d bs=1M skip=$r count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
        b=$(dd if=/dev/$d bs=1M skip=$((r + 1)) count=1 2>/dev/null | md5sum | cut -d' ' -f1)
        c=$(dd if=/dev/$d bs=1M skip=$((r + 1)) count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
        [ "$a" = "$(md5 /tmp/d$r)" ] || { fail "O_DIRECT data at MiB $r differs"; return 1; }
        [ "$b" = "$(md5 /tmp/b$r)" ] || { fail "buffered data at MiB $((r + 1)) differs (buffered read)"; return 1; }
        [ "$c" = "$(md5 /tmp/b$r)" ] || { fail "buffered data at MiB $((r + 1)) differs (direct read)"; return 1; }
        info "MiB $r..$((r + 2)) of $mib read back equal"
    done
    e=$(dd if=/dev/$d bs=512 skip=$last count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$e" = "$(md5 /tmp/last)" ] || { fail "last sector ($last) differs"; return 1; }
    rm -f /tmp/d* /tmp/b* /tmp/last
}

make_files() {  # make_files DIR: files of assorted sizes, checksums in /tmp/sums
    mkdir -p "$1/tree/a/b" || return 1
    i=1
    while [ $i -le 12 ]; do
        dd if=/dev/urandom of="$1/tree/f$i" bs=4k count=$((i * i)) 2>/dev/null || return 1
        i=$((i + 1))
    done
    dd if=/dev/urandom of="$1/tree/a/b/big" bs=1M count=16 2>/dev/null || return 1
    echo hello >"$1/tree/a/small"
    (cd "$1/tree" && find . -type f | sort | xargs md5sum) >/tmp/sums
}

s_ext4() {
    [ -n "$PLAIN_DISK" ] || { fail "no disk (step 1 failed)"; return 1; }
    d=$PLAIN_DISK
    run mkfs.ext4 -F -q -L sanstack /dev/$d || return 1
    run mount -t ext4 /dev/$d /mnt || return 1
    make_files /mnt || { umount /mnt; fail "writing files failed"; return 1; }
    sync
    run umount /mnt || return 1
    run e2fsck -fn /dev/$d || return 1
    echo 3 >/proc/sys/vm/drop_caches
    run mount -t ext4 -o ro /dev/$d /mnt || return 1
    (cd /mnt/tree && md5sum -c /tmp/sums) >/tmp/out 2>&1
    rc=$?
    umount /mnt
    [ $rc -eq 0 ] || { tail -n 5 /tmp/out; fail "files read back after remount differ"; return 1; }
    EXT4_DONE=1
}

s_logout() {
    [ -n "$PLAIN_SID" ] || { fail "no session (step 1 failed)"; return 1; }
    logout "$IQN" "$PORT" "$PLAIN_SID" "$PLAIN_DISK" || return 1
    [ -z "$(session_id "$IQN" "$PORT")" ] || { fail "iscsiadm still lists the session"; return 1; }
    PLAIN_SID=""; PLAIN_DISK=""
}

# ---------------------------------------------------------------- step 5: CHAP and digests
chap_login() {  # chap_login IQN NAME [KEY VALUE]... -> login + I/O + session info + logout
    _q=$1; _n=$2; shift 2
    node_new "$_q" "$PORT" "$TPGT" "$@" || return 1
    login "$_q" "$PORT" || return 1
    check_rw "$DISK" 4 4 || return 1
    session_info "$_n" "$SID"
    logout "$_q" "$PORT" "$SID" "$DISK"
}

expect_login_fails() {  # expect_login_fails IQN WHY [KEY VALUE]...
    _q=$1; _why=$2; shift 2
    node_new "$_q" "$PORT" "$TPGT" "$@" || return 1
    if iscsiadm -m node -T "$_q" -p "$HOST:$PORT" --login </dev/null >/tmp/out 2>&1; then
        cat /tmp/out
        fail "login succeeded with $_why"
        iscsiadm -m node -T "$_q" -p "$HOST:$PORT" --logout >/dev/null 2>&1
        return 1
    fi
    info "login refused as expected ($_why): $(grep -m1 "reported error" /tmp/out)"
    iscsiadm -m node -o delete -T "$_q" -p "$HOST:$PORT" >/dev/null 2>&1
    return 0
}

A=node.session.auth
s_chap() {
    fresh || return 1
    [ -n "$CFG_chap_iqn" ] || { fail "no CHAP target configured"; return 1; }
    expect_login_fails "$CFG_chap_iqn" "a wrong CHAP secret" $A.authmethod CHAP \
        $A.username "$CFG_chap_user" $A.password "wrong-${CFG_chap_secret}" || return 1
    chap_login "$CFG_chap_iqn" chap-oneway $A.authmethod CHAP \
        $A.username "$CFG_chap_user" $A.password "$CFG_chap_secret"
}

s_mutual() {
    fresh || return 1
    [ -n "$CFG_mutual_iqn" ] || { fail "no mutual CHAP target configured"; return 1; }
    expect_login_fails "$CFG_mutual_iqn" "a wrong target secret (mutual CHAP)" $A.authmethod CHAP \
        $A.username "$CFG_mutual_user" $A.password "$CFG_mutual_secret" \
        $A.username_in "$CFG_mutual_tuser" $A.password_in "wrong-${CFG_mutual_tsecret}" || return 1
    chap_login "$CFG_mutual_iqn" chap-mutual $A.authmethod CHAP \
        $A.username "$CFG_mutual_user" $A.password "$CFG_mutual_secret" \
        $A.username_in "$CFG_mutual_tuser" $A.password_in "$CFG_mutual_tsecret"
}

s_digest() {
    fresh || return 1
    node_new "$IQN" "$PORT" "$TPGT" 'node.conn[0].iscsi.HeaderDigest' CRC32C \
        'node.conn[0].iscsi.DataDigest' CRC32C || return 1
    login "$IQN" "$PORT" || return 1
    session_info digest "$SID"
    iscsiadm -m session -r "$SID" -P 2 >/tmp/p2 2>&1
    grep -q "HeaderDigest: CRC32C" /tmp/p2 || { fail "HeaderDigest not CRC32C: $(grep Digest /tmp/p2 | tr '\n' ' ')"; return 1; }
    grep -q "DataDigest: CRC32C" /tmp/p2 || { fail "DataDigest not CRC32C: $(grep Digest /tmp/p2 | tr '\n' ' ')"; return 1; }
    check_rw "$DISK" 16 8 || return 1
    logout "$IQN" "$PORT" "$SID" "$DISK"
}

# ---------------------------------------------------------------- step 6: iscsistart + iscsid
s_iscsistart() {
    fresh || return 1
    stop_iscsid || return 1
    run iscsistart -i "$INAME" -t "$IQN" -g "$TPGT" -a "$HOST" -p "$PORT" || { start_iscsid; return 1; }
    SID=$(ls /sys/class/iscsi_session | sed -n 's/^session//p' | sort -n | tail -n 1)
    DISK=$(wait_disk "$SID" "$LUN") || { start_iscsid; fail "no disk after iscsistart"; return 1; }
    info "iscsistart: session $SID disk $DISK"
    check_rw "$DISK" 32 2 || { start_iscsid; return 1; }
    # iscsid takes the session over: drops the connection and logs in again (same ISID).
    : >/tmp/iscsid.log
    start_iscsid || return 1
    n=0
    while ! grep -q "operational after recovery" /tmp/iscsid.log; do
        n=$((n + 1)); [ $n -gt 300 ] && { cat /tmp/iscsid.log; fail "iscsid did not take the session over in 30 s"; return 1; }
        sleep 0.1
    done
    info "iscsid: $(grep 'operational after recovery' /tmp/iscsid.log | tail -n 1)"
    check_rw "$DISK" 34 2 || return 1
    run iscsiadm -m session -r "$SID" -u || return 1
    n=0
    while [ -e /sys/class/iscsi_session/session$SID ]; do
        n=$((n + 1)); [ $n -gt 100 ] && { fail "session $SID still present after logout"; return 1; }
        sleep 0.1
    done
}

# ---------------------------------------------------------------- step 7: target restart
s_restart() {
    fresh || return 1
    node_new "$IQN" "$PORT" "$TPGT" || return 1
    login "$IQN" "$PORT" || return 1
    d=$DISK
    if [ -z "$EXT4_DONE" ]; then run mkfs.ext4 -F -q /dev/$d || return 1; fi
    run mount -t ext4 /dev/$d /mnt || return 1
    mkdir -p /mnt/restart
    dd if=/dev/urandom of=/mnt/restart/before bs=1M count=4 2>/dev/null
    sync
    : >/tmp/iscsid.log
    request stop-target || { umount /mnt; return 1; }
    # I/O issued while the target is down: queued by the kernel until the session recovers.
    dd if=/dev/urandom of=/tmp/during bs=1M count=4 2>/dev/null
    (dd if=/tmp/during of=/mnt/restart/during bs=1M conv=fsync 2>/dev/null; echo $? >/tmp/during.rc) &
    writer=$!
    sleep 3
    info "session state while the target is down: $(cat /sys/class/iscsi_session/session$SID/state)"
    request start-target || return 1
    n=0
    while [ "$(cat /sys/class/iscsi_session/session$SID/state)" != LOGGED_IN ] || ! [ -e /tmp/during.rc ]; do
        n=$((n + 1)); [ $n -gt 900 ] && { fail "no recovery within 90 s (state $(cat /sys/class/iscsi_session/session$SID/state))"; return 1; }
        sleep 0.1
    done
    wait $writer
    [ "$(cat /tmp/during.rc)" = 0 ] || { fail "write during the outage failed"; return 1; }
    grep -q "operational after recovery" /tmp/iscsid.log || { fail "iscsid logged no recovery"; return 1; }
    info "recovered: $(grep 'operational after recovery' /tmp/iscsid.log | tail -n 1)"
    dd if=/dev/urandom of=/mnt/restart/after bs=1M count=2 2>/dev/null
    sync
    (cd /mnt/restart && md5sum before during after) >/tmp/rsums
    run umount /mnt || return 1
    echo 3 >/proc/sys/vm/drop_caches
    run e2fsck -fn /dev/$d || return 1
    run mount -t ext4 -o ro /dev/$d /mnt || return 1
    cmp /tmp/during /mnt/restart/during || { umount /mnt; fail "data written during the outage differs"; return 1; }
    (cd /mnt/restart && md5sum -c /tmp/rsums) >/tmp/out 2>&1 || { umount /mnt; fail "files differ after recovery"; return 1; }
    if [ -n "$EXT4_DONE" ]; then
        (cd /mnt/tree && md5sum -c /tmp/sums) >/tmp/out 2>&1 || { umount /mnt; fail "step 3 files differ after the restart"; return 1; }
    fi
    umount /mnt
    logout "$IQN" "$PORT" "$SID" "$d"
}

# ---------------------------------------------------------------- step 8: two portals + dm-multipath
s_multipath() {
    fresh || return 1
    P2=${CFG_port2}; T2=${CFG_tpgt2:-$TPGT}
    [ -n "$P2" ] || { fail "no second portal configured"; return 1; }
    node_new "$IQN" "$PORT" "$TPGT" || return 1
    node_new "$IQN" "$P2" "$T2" || return 1
    login "$IQN" "$PORT" || return 1
    S1=$SID; D1=$DISK
    login "$IQN" "$P2" || return 1
    S2=$SID; D2=$DISK
    w1=$(cat /sys/block/$D1/device/wwid 2>/dev/null); w2=$(cat /sys/block/$D2/device/wwid 2>/dev/null)
    info "path 1 $D1 wwid '$w1'; path 2 $D2 wwid '$w2'"
    [ -n "$w1" ] && [ "$w1" = "$w2" ] || { fail "the two paths do not report the same LU identifier"; return 1; }
    sect=$(cat /sys/block/$D1/size)
    mm1=$(cat /sys/block/$D1/dev); mm2=$(cat /sys/block/$D2/dev)
    # multipath-tools needs udev; the guest has none, so the map is made by hand with dmsetup
    # (the same dm-multipath target multipathd would load): round-robin, 1 I/O per path turn.
    export DM_DISABLE_UDEV=1
    run dmsetup create sanmp --table "0 $sect multipath 0 0 1 1 round-robin 0 2 1 $mm1 1 $mm2 1" || return 1
    dmsetup mknodes sanmp >/dev/null 2>&1
    [ -b /dev/mapper/sanmp ] || { fail "no /dev/mapper/sanmp"; return 1; }
    w0a=$(awk '{print $5}' /sys/block/$D1/stat); w0b=$(awk '{print $5}' /sys/block/$D2/stat)
    check_rw mapper/sanmp 40 8 || return 1
    wa=$(( $(awk '{print $5}' /sys/block/$D1/stat) - w0a )); wb=$(( $(awk '{print $5}' /sys/block/$D2/stat) - w0b ))
    info "writes through the map: path 1 $wa, path 2 $wb"
    [ $wa -gt 0 ] && [ $wb -gt 0 ] || { fail "round-robin did not use both paths"; return 1; }
    # Fail path 2: I/O must go on through path 1 alone.
    echo offline >/sys/block/$D2/device/state
    check_rw mapper/sanmp 48 4 || return 1
    st=$(dmsetup status sanmp)
    info "dmsetup status with path 2 offline: $st"
    echo "$st" | grep -q "$mm2 F" || { fail "dm-multipath did not fail path 2"; return 1; }
    echo running >/sys/block/$D2/device/state
    run dmsetup message sanmp 0 reinstate_path "$mm2" || return 1
    check_rw mapper/sanmp 52 4 || return 1
    info "dmsetup status after reinstating path 2: $(dmsetup status sanmp)"
    run dmsetup remove sanmp || return 1
    logout "$IQN" "$P2" "$S2" "$D2" || return 1
    logout "$IQN" "$PORT" "$S1" "$D1"
}

# ---------------------------------------------------------------- main
echo "InitiatorName=$INAME" >/etc/iscsi/initiatorname.iscsi
cat >/etc/iscsi/iscsid.conf <<'EOF'
# open-iscsi defaults except: manual node startup (no autologin), short login retries so a
# broken login fails within the harness's time budget.
node.startup = manual
node.session.initial_login_retry_max = 2
node.conn[0].timeo.login_timeout = 15
node.conn[0].timeo.logout_timeout = 15
node.session.timeo.replacement_timeout = 120
node.conn[0].timeo.noop_out_interval = 5
node.conn[0].timeo.noop_out_timeout = 5
node.session.err_timeo.abort_timeout = 15
node.session.err_timeo.lu_reset_timeout = 30
node.session.iscsi.InitialR2T = No
node.session.iscsi.ImmediateData = Yes
node.session.iscsi.FirstBurstLength = 262144
node.session.iscsi.MaxBurstLength = 16776192
node.conn[0].iscsi.MaxRecvDataSegmentLength = 262144
node.session.cmds_max = 128
node.session.queue_depth = 32
EOF

info "initiator $INAME -> $IQN lun $LUN at $HOST:$PORT tpgt $TPGT; steps ${CFG_steps}"
start_iscsid || { echo "$M STEP 0 iscsid FAIL $FAILMSG"; halt FAIL; }

for s in $(echo "${CFG_steps:-discovery,io,ext4,logout}" | tr ',' ' '); do
    case $s in
        discovery) step 1 discovery-login s_discovery ;;
        io) step 2 raw-io s_io ;;
        ext4) step 3 ext4 s_ext4 ;;
        logout) step 4 logout s_logout ;;
        chap) step 5a chap-oneway s_chap ;;
        mutual) step 5b chap-mutual s_mutual ;;
        digest) step 5c crc32c-digests s_digest ;;
        iscsistart) step 6 iscsistart-takeover s_iscsistart ;;
        restart) step 7 target-restart s_restart ;;
        multipath) step 8 multipath s_multipath ;;
        *) echo "$M STEP ? $s FAIL unknown step"; FAILED=1 ;;
    esac
done

echo "$M BEGIN-ISCSID-LOG"
tail -n 60 /tmp/iscsid.log
echo "$M END-ISCSID-LOG"
if [ $FAILED -eq 0 ]; then halt PASS; else halt FAIL; fi
