#!/bin/busybox sh
# /init of qmpdump's test guest (busybox-static + Debian's virtio-mem modules).
# Loads the modules, onlines hot-plugged memory, writes a known pattern of
# qmpdump.pattern_mib MiB into a tmpfs file and prints QMPDUMP-READY on ttyS0.
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin /pattern
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "QMPDUMP-BOOT kernel=$(uname -r)"

for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "QMPDUMP-ERROR insmod $m"
done

# memhp_default_state=online_movable onlines hot-plugged blocks; online any straggler.
for s in /sys/devices/system/memory/memory*/state; do
    [ "$(cat "$s")" = offline ] && echo online_movable > "$s"
done

mib=0
wmib=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        qmpdump.pattern_mib=*) mib="${arg#qmpdump.pattern_mib=}" ;;
        qmpdump.writer_mib=*) wmib="${arg#qmpdump.writer_mib=}" ;;
    esac
done
if [ "$mib" -gt 0 ]; then
    mount -t tmpfs -o size=100% tmpfs /pattern
    # 16-byte unit doubled to 1 MiB, then appended: fast even under TCG.
    printf '@UNIT@' > /tmp/unit
    i=0
    while [ $i -lt 16 ]; do cat /tmp/unit /tmp/unit > /tmp/u2; mv /tmp/u2 /tmp/unit; i=$((i+1)); done
    n=0
    while [ $n -lt "$mib" ]; do cat /tmp/unit; n=$((n+1)); done > /pattern/data
    rm /tmp/unit
fi
if [ "$wmib" -gt 0 ]; then
    # The consistency workload (genstamp.c): stamps generations into its pages, forever.
    /bin/genstamp "$wmib" &
    sleep 1
fi
echo "QMPDUMP-READY pattern_mib=$mib $(grep MemTotal /proc/meminfo | tr -s ' ')"

# Stay up; a shell on the console lets a test type commands if it connects.
while true; do
    setsid cttyhack sh
    sleep 1
done
