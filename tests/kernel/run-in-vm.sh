#!/bin/bash
# run-in-vm.sh -- run a command inside a throw-away guest running a REAL Linux
# kernel that has device-mapper (dm-era, dm-log-writes, ...), nbd and loop as
# modules.  The guest sees the HOST's root filesystem read-only, with a tmpfs
# overlay on top, so it can run the host's python3/dmsetup/losetup/nbd-client
# and write anywhere (writes are discarded; /tmp, /run, /dev/shm are fresh
# tmpfs).  The command runs as root in the host's current directory.
#
# Two backends:
#   qemu (default): Debian's x86_64 kernel (linux-image-amd64) under
#         qemu-system-x86_64; root shared over virtio-9p (readonly=on);
#         TCG emulation unless real VT-x/AMD-V KVM is available.
#   uml:  Debian's User-Mode-Linux kernel (user-mode-linux: /usr/bin/linux.uml,
#         modules in /usr/lib/uml/modules); root shared via hostfs.  Boots in
#         ~1.5 s and runs guest code at native speed, but syscalls are slow
#         (ptrace) and it is a different arch (um), single CPU.
#
# stdout/stderr of the command stream back to this script's stdout/stderr and
# its exit status becomes this script's exit status.
#
# Usage: run-in-vm.sh [options] [--] COMMAND [ARGS...]
#   COMMAND with ARGS is run as-is (argv preserved); a single argument is run
#   through `bash -c`, so `run-in-vm.sh 'modprobe dm-era && dmsetup targets'` works.
# Options (each also settable by env var):
#   -b NAME   backend: qemu | uml       VM_BACKEND  (default: qemu)
#   -k PATH   kernel image             VM_KERNEL   (default: newest /boot/vmlinuz-*,
#                                                   or /usr/bin/linux.uml for uml)
#   -m SIZE   guest memory              VM_MEM      (default: 2G)
#   -c N      guest vCPUs (qemu only)   VM_CPUS     (default: host nproc)
#   -w DIR    share host DIR read-write at the same path (repeatable)
#                                       VM_RW_DIRS  (colon separated)
#   -t SECS   wall-clock limit          VM_TIMEOUT  (default: 3600)
#   -a ACCEL  kvm | tcg | auto (qemu)   VM_ACCEL    (default: auto)
#   -e NAME   pass host env var NAME into the guest (repeatable)
#                                       VM_PASS_ENV (space separated)
#   -u        start systemd-udevd in the guest (no coldplug), so dmsetup uses
#             udev sync and udev rules make /dev/mapper/* and /dev/disk/*
#             links; without it DM_DISABLE_UDEV=1 is exported and libdevmapper
#             creates /dev/mapper/* nodes itself        VM_UDEV=1
#   -s        boot systemd as PID 1 (the host's /lib/systemd/systemd) and run the
#             command as run-in-vm.service, the one unit of run-in-vm.target (with
#             journald): systemctl and journalctl work in the command   VM_SYSTEMD=1
#   -v        copy the guest kernel console to stderr after the run
#                                       VM_VERBOSE=1
# In the guest RUN_IN_VM=qemu|uml is set.
# Exit codes: the command's own, or
#   120 bad usage/setup, 121 guest did not report a status (kernel panic,
#   init failure; the console log tail is printed), 124 timeout.
#
# Host packages (Debian 12):
#   qemu backend: qemu-system-x86 linux-image-amd64 busybox-static kmod cpio
#   uml backend:  user-mode-linux kmod
#   guest tools:  dmsetup thin-provisioning-tools nbd-client nbdkit qemu-utils
set -u -o pipefail

die() { echo "run-in-vm: $*" >&2; exit 120; }

BACKEND=${VM_BACKEND:-qemu}
KERNEL=${VM_KERNEL:-}
MEM=${VM_MEM:-2G}
CPUS=${VM_CPUS:-$(nproc)}
TIMEOUT=${VM_TIMEOUT:-3600}
ACCEL=${VM_ACCEL:-auto}
VERBOSE=${VM_VERBOSE:-0}
UDEV=${VM_UDEV:-0}
SYSTEMD=${VM_SYSTEMD:-0}
RW_DIRS=()
IFS=: read -r -a RW_DIRS <<<"${VM_RW_DIRS:-}"
read -r -a PASS_ENV <<<"${VM_PASS_ENV:-}"

while getopts "b:k:m:c:w:t:a:e:usvh" opt; do
  case $opt in
    b) BACKEND=$OPTARG ;;
    k) KERNEL=$OPTARG ;;
    m) MEM=$OPTARG ;;
    c) CPUS=$OPTARG ;;
    w) RW_DIRS+=("$OPTARG") ;;
    t) TIMEOUT=$OPTARG ;;
    a) ACCEL=$OPTARG ;;
    e) PASS_ENV+=("$OPTARG") ;;
    u) UDEV=1 ;;
    s) SYSTEMD=1 ;;
    v) VERBOSE=1 ;;
    h) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
    *) exit 120 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || die "no command given (see -h)"
command -v modprobe >/dev/null || die "modprobe missing: apt-get install kmod"
if [ "$SYSTEMD" = 1 ] && [ ! -x /lib/systemd/systemd ]; then
  die "-s: /lib/systemd/systemd missing: apt-get install systemd"
fi

# ------------------------------------------------------- backend checks
case $BACKEND in
qemu)
  if [ -z "$KERNEL" ]; then
    KERNEL=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n1)
    [ -n "$KERNEL" ] || die "no /boot/vmlinuz-*: apt-get install linux-image-amd64"
  fi
  [ -r "$KERNEL" ] || die "kernel $KERNEL not readable"
  KVER=${VM_KVER:-$(basename "$KERNEL" | sed 's/^vmlinuz-//')}
  [ -d "/lib/modules/$KVER" ] || die "/lib/modules/$KVER missing (kernel package not installed?)"
  QEMU=${VM_QEMU:-$(command -v qemu-system-x86_64)} || die "qemu-system-x86_64 missing: apt-get install qemu-system-x86"
  BUSYBOX=${VM_BUSYBOX:-$(command -v busybox)} || die "busybox missing: apt-get install busybox-static"
  if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is dynamically linked: apt-get install busybox-static"; fi
  command -v cpio >/dev/null || die "cpio missing: apt-get install cpio"
  # /dev/kvm can exist without VT-x/AMD-V (e.g. a PVM-only KVM in a nested
  # sandbox, which only runs PVM-enabled guest kernels: a stock kernel hangs
  # silently there).  'auto' therefore also requires vmx/svm in /proc/cpuinfo.
  if [ "$ACCEL" = auto ]; then
    if [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ]; then
      ACCEL=kvm
    else
      ACCEL=tcg
    fi
  fi
  case $ACCEL in
    kvm) ACCEL_ARGS=(-accel kvm -cpu host) ;;
    tcg) ACCEL_ARGS=(-accel tcg,thread=multi -cpu max) ;;
    *) die "bad accel $ACCEL" ;;
  esac
  ;;
uml)
  KERNEL=${KERNEL:-$(command -v linux.uml || command -v linux)} || die "linux.uml missing: apt-get install user-mode-linux"
  KVER=${VM_KVER:-$(ls -1 /usr/lib/uml/modules 2>/dev/null | sort -V | tail -n1)}
  [ -n "$KVER" ] && [ -d "/usr/lib/uml/modules/$KVER" ] || die "/usr/lib/uml/modules/<version> missing"
  ACCEL=uml
  ;;
*) die "bad backend $BACKEND (qemu|uml)" ;;
esac

# --------------------------------------------------------------- workdir
WORK=$(mktemp -d "${TMPDIR:-/tmp}/run-in-vm.XXXXXX") || die "mktemp failed"
WORK=$(realpath "$WORK")
QPID= CAT_OUT= CAT_ERR=
cleanup() {
  [ -n "$QPID" ] && kill "$QPID" 2>/dev/null
  [ -n "$CAT_OUT" ] && kill "$CAT_OUT" 2>/dev/null
  [ -n "$CAT_ERR" ] && kill "$CAT_ERR" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
CTL=$WORK/ctl
mkdir -p "$CTL"

# ---------------------------------------------------- guest-side scripts
if [ $# -eq 1 ]; then
  printf 'exec bash -c %q\n' "$1" >"$CTL/cmd.sh"
else
  { printf 'exec'; printf ' %q' "$@"; printf '\n'; } >"$CTL/cmd.sh"
fi
{
  for v in PATH HOME LANG LC_ALL TERM PYTHONPATH VIRTUAL_ENV PYENV_ROOT PYENV_VERSION CI "${PASS_ENV[@]}"; do
    [ -n "${!v+x}" ] && printf 'export %s=%q\n' "$v" "${!v}"
  done
  printf 'VM_UDEV=%q\n' "$UDEV"
  printf 'VM_SYSTEMD=%q\n' "$SYSTEMD"
  printf 'export RUN_IN_VM=%q\n' "$BACKEND"
  printf 'cd %q 2>/dev/null || cd /\n' "$PWD"
} >"$CTL/env.sh"
: >"$CTL/rwdirs"
for d in "${RW_DIRS[@]}"; do
  [ -n "$d" ] || continue
  d=$(realpath -m "$d"); mkdir -p "$d" || die "cannot create $d"
  echo "$d" >>"$CTL/rwdirs"
done

# stage2: runs as PID 1 inside the guest (host's bash, on the overlay root,
# ctl dir mounted read-write at /run/vmctl); with -s it execs systemd, which runs
# it again (--command) as run-in-vm.service
cat >"$CTL/stage2.sh" <<'EOF'
port() { for p in /sys/class/virtio-ports/*; do [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && echo "/dev/$(basename "$p")" && return; done; echo /dev/console; }
export HOME=/root
. /run/vmctl/env.sh
if [ "$RUN_IN_VM" = uml ]; then
  OUT=/dev/tty1 ERR=/dev/tty2          # UML con1/con2 = host fd 1/2
  stty -F $OUT raw -echo 2>/dev/null; stty -F $ERR raw -echo 2>/dev/null
else
  OUT=$(port vm.stdout); ERR=$(port vm.stderr)
fi
hostname run-in-vm 2>/dev/null
if [ "$VM_SYSTEMD" = 1 ] && [ "${1:-}" != --command ]; then
  # systemd becomes PID 1 and runs this script again, as a service, for the command.
  # The guest is no container: the host's marker file would make systemd think so.
  rm -f /.dockerenv
  mkdir -p /run/systemd/system
  cat >/run/systemd/system/run-in-vm.target <<EOT
[Unit]
Description=run-in-vm: the command
Requires=run-in-vm.service
After=run-in-vm.service
Wants=systemd-journald.service
AllowIsolate=yes
EOT
  # The command starts once sysinit.target is reached (as a real boot's services do),
  # so that nothing of it (systemd-tmpfiles cleaning /tmp, say) runs meanwhile.
  cat >/run/systemd/system/run-in-vm.service <<EOT
[Unit]
Description=run-in-vm: the command
[Service]
Type=exec
ExecStart=/bin/bash /run/vmctl/stage2.sh --command
StandardInput=null
StandardOutput=file:$OUT
StandardError=file:$ERR
IgnoreSIGPIPE=no
TimeoutStartSec=infinity
EOT
  exec /lib/systemd/systemd --system --unit=run-in-vm.target
fi
if [ "$VM_UDEV" = 1 ] && [ -x /lib/systemd/systemd-udevd ]; then
  /lib/systemd/systemd-udevd --daemon >/dev/null 2>&1
else
  export DM_DISABLE_UDEV=1   # libdevmapper then creates /dev/mapper/<name> itself
fi
( . /run/vmctl/cmd.sh ) </dev/null >"$OUT" 2>"$ERR"
rc=$?
echo "$rc" >/run/vmctl/rc
sync
if [ "$RUN_IN_VM" = uml ]; then
  echo o >/proc/sysrq-trigger   # power off (asynchronous)
else
  echo b >/proc/sysrq-trigger   # immediate reset; qemu runs with -no-reboot so it exits
fi
sleep 30
EOF

# common mount setup inside the guest: $R = new root (overlay), prepared
# before stage2.  Used by both the qemu initramfs and the uml stage1.
cat >"$WORK/mounts.sh" <<'EOF'
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
ln -sf /proc/self/fd $R/dev/fd
ln -sf /proc/self/fd/0 $R/dev/stdin
ln -sf /proc/self/fd/1 $R/dev/stdout
ln -sf /proc/self/fd/2 $R/dev/stderr
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mount -t tmpfs -o mode=0755 tmpfs $R/run
mkdir -p $R/run/vmctl
EOF

# ------------------------------------------------------------ qemu boot
boot_qemu() {
  local IR=$WORK/initramfs
  mkdir -p "$IR"/{bin,dev,proc,sys,lower,rw,newroot,mods}
  cp "$BUSYBOX" "$IR/bin/busybox"
  : >"$IR/mods/order"
  for m in virtio_pci 9pnet_virtio 9p virtio_console overlay; do
    modprobe -S "$KVER" --show-depends "$m" 2>/dev/null | awk '$1=="insmod"{print $2}'
  done | awk '!seen[$0]++' | while read -r ko; do
    b=$(basename "$ko"); b=${b%.xz}; b=${b%.zst}; b=${b%.gz}
    case $ko in
      *.xz) xz -dc "$ko" >"$IR/mods/$b" ;;
      *.zst) zstd -qdc "$ko" >"$IR/mods/$b" ;;
      *.gz) gzip -dc "$ko" >"$IR/mods/$b" ;;
      *) cp "$ko" "$IR/mods/$b" ;;
    esac
    echo "$b" >>"$IR/mods/order"
  done
  # (built-in modules simply do not appear in --show-depends output)
  cp "$WORK/mounts.sh" "$IR/mounts.sh"
  cp "$CTL/rwdirs" "$IR/rwdirs"
  cat >"$IR/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "initramfs: $*"; echo b >/proc/sysrq-trigger; sleep 5; }
for m in $(cat /mods/order); do insmod /mods/$m || echo "initramfs: insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower || fail "9p root mount failed"
mount -t tmpfs -o mode=0755 tmpfs /rw && mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "overlay mount failed"
R=/newroot
. /mounts.sh
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 vmctl $R/run/vmctl || fail "vmctl mount failed"
i=0
while read -r dir; do
  [ -n "$dir" ] || continue
  mkdir -p "$R$dir"
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 "rw$i" "$R$dir" || fail "rw share $dir failed"
  i=$((i+1))
done </rwdirs
ip link set lo up
echo "initramfs: switching root"
exec switch_root $R /bin/bash /run/vmctl/stage2.sh
EOF
  chmod +x "$IR/init"
  (cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1 >"$WORK/initrd.gz") || die "initramfs build failed"
  rm -rf "$IR"

  local rw=() i=0 d
  while read -r d; do
    [ -n "$d" ] || continue
    rw+=(-fsdev "local,id=rw$i,path=$d,security_model=none,multidevs=remap"
         -device "virtio-9p-pci,fsdev=rw$i,mount_tag=rw$i")
    i=$((i+1))
  done <"$CTL/rwdirs"

  # The guest's stdout/stderr ports are written by qemu into FIFOs that `cat`
  # copies to our own fd 1/2 (so they share the caller's file offsets, unlike
  # letting qemu open /proc/self/fd/1 itself).
  mkfifo "$WORK/out.fifo" "$WORK/err.fifo" || die "mkfifo failed"
  cat "$WORK/out.fifo" &
  CAT_OUT=$!
  cat "$WORK/err.fifo" >&2 &
  CAT_ERR=$!
  timeout -k 5 "$TIMEOUT" "$QEMU" -name run-in-vm -M pc "${ACCEL_ARGS[@]}" -smp "$CPUS" -m "$MEM" \
    -nodefaults -no-user-config -display none -vga none -no-reboot \
    -kernel "$KERNEL" -initrd "$WORK/initrd.gz" \
    -append "console=ttyS0 quiet loglevel=4 panic=-1 tsc=reliable rw" \
    -chardev "file,id=con,path=$WORK/console.log" -serial chardev:con \
    -monitor none \
    -fsdev "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap" \
    -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
    -fsdev "local,id=vmctl,path=$CTL,security_model=none,multidevs=remap" \
    -device virtio-9p-pci,fsdev=vmctl,mount_tag=vmctl \
    "${rw[@]}" \
    -device virtio-serial-pci \
    -chardev "file,id=out,path=$WORK/out.fifo" -device virtserialport,chardev=out,name=vm.stdout \
    -chardev "file,id=err,path=$WORK/err.fifo" -device virtserialport,chardev=err,name=vm.stderr \
    </dev/null &
  QPID=$!   # pid of `timeout`, which forwards signals to qemu
  wait "$QPID"; QRC=$?
  QPID=
  # if qemu never opened a FIFO, its cat still blocks in open(): a read-write
  # open+close (never blocks) lets it see EOF
  for f in out err; do exec {fd}<>"$WORK/$f.fifo"; exec {fd}>&-; done
  wait "$CAT_OUT" "$CAT_ERR" 2>/dev/null
  CAT_OUT= CAT_ERR=
}

# ------------------------------------------------------------- uml boot
boot_uml() {
  # stage1 runs as PID 1 with the host's bash, on the read-only hostfs root
  {
    echo '#!/bin/bash'
    printf 'WORK=%q KVER=%q SYSTEMD=%q\n' "$WORK" "$KVER" "$SYSTEMD"
    cat <<'EOF'
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
fail() { echo "uml stage1: $*"; echo o >/proc/sysrq-trigger; sleep 30; }
mount -t proc proc /proc; mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run || fail "tmpfs"
mkdir -p /run/ovl/upper /run/ovl/work /run/ovl/root
insmod /usr/lib/uml/modules/$KVER/kernel/fs/overlayfs/overlay.ko 2>/dev/null
mount -t overlay overlay -o lowerdir=/,upperdir=/run/ovl/upper,workdir=/run/ovl/work /run/ovl/root || fail "overlay"
R=/run/ovl/root
. $WORK/mounts.sh
# the UML kernel's modules appear as /lib/modules/<uml version>
mkdir -p $R/usr/lib/modules && mount -t tmpfs tmpfs $R/usr/lib/modules &&
  mkdir -p $R/usr/lib/modules/$KVER &&
  mount --bind /usr/lib/uml/modules/$KVER $R/usr/lib/modules/$KVER || fail "modules"
mount -t hostfs -o $WORK/ctl none $R/run/vmctl || fail "vmctl"
while read -r dir; do
  [ -n "$dir" ] || continue
  mkdir -p "$R$dir"; mount -t hostfs -o "$dir" none "$R$dir" || fail "rw share $dir"
done <$WORK/ctl/rwdirs
ip link set lo up 2>/dev/null
if [ "$SYSTEMD" = 1 ]; then
  # pivot_root, not chroot: in a chroot the kernel refuses user namespaces, which
  # systemd's PrivateUsers= needs. The host's root is detached once the overlay is /.
  mkdir -p $R/run/oldroot && cd $R && pivot_root . run/oldroot || fail "pivot_root"
  exec chroot . /bin/bash -c 'umount -l /run/oldroot; rmdir /run/oldroot; exec /bin/bash /run/vmctl/stage2.sh'
fi
cd $R && exec chroot $R /bin/bash /run/vmctl/stage2.sh
EOF
  } >"$WORK/stage1.sh"
  chmod +x "$WORK/stage1.sh" "$WORK/mounts.sh"
  # con0 (kernel console) -> console.log; con1 -> our stdout; con2 -> our stderr
  exec 3>>"$WORK/console.log"
  TMPDIR=/dev/shm timeout -k 5 "$TIMEOUT" "$KERNEL" mem="$MEM" \
    root=/dev/root rootfstype=hostfs rootflags=/ ro init="$WORK/stage1.sh" \
    con=null con0=null,fd:3 con1=null,fd:1 con2=null,fd:2 ssl=null quiet \
    </dev/null &
  QPID=$!
  wait "$QPID"; QRC=$?
  QPID=
  exec 3>&-
}

QRC=0
boot_$BACKEND

if [ "$VERBOSE" = 1 ]; then
  echo "----- guest console ($BACKEND/$ACCEL) -----" >&2; cat "$WORK/console.log" >&2
fi
if [ -s "$CTL/rc" ]; then
  exit "$(cat "$CTL/rc")"
fi
if [ "$QRC" = 124 ] || [ "$QRC" = 137 ]; then
  echo "run-in-vm: timeout after ${TIMEOUT}s; console tail:" >&2
  tail -n 30 "$WORK/console.log" >&2 2>/dev/null
  exit 124
fi
echo "run-in-vm: guest reported no exit status (vm rc=$QRC); console tail:" >&2
tail -n 30 "$WORK/console.log" >&2 2>/dev/null
exit 121
