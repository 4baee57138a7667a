#!/usr/bin/env bash
# Boots a codespace kernel image in QEMU; the cargo runner for x86_64-unknown-none.
#
#   run-qemu.sh KERNEL [extra qemu args...]
#
# Exit status: 0 when the kernel reported success through isa-debug-exit, 1 on failure (or any
# other end: reset, triple fault, QEMU error), 124 when it ran past the timeout.
# Environment:
#   CODESPACE_QEMU_TIMEOUT  seconds before the kernel is killed (default 120)
#   CODESPACE_QEMU_MEMORY   guest memory (default 512M)
#   CODESPACE_QEMU_SMP      guest CPUs (default 1); the kernel starts all of them
#   CODESPACE_QEMU_ACCEL    kvm or tcg (default: kvm when a probe boot under /dev/kvm is quick, else tcg)
#   CODESPACE_QEMU_APPEND   kernel command line (cargo run -- ARGS sets it)
#   CODESPACE_QEMU_MODULES  comma-separated files handed to the kernel as Multiboot modules
#                           (precompiled wasm: the launcher sets it)
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: run-qemu.sh KERNEL [qemu args...]" >&2
    exit 2
fi
kernel=$1
shift

qemu=qemu-system-x86_64
if ! command -v "$qemu" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "run-qemu.sh: $qemu not found; installing the Debian package qemu-system-x86" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86) >&2 \
            || { echo "run-qemu.sh: installing qemu-system-x86 failed" >&2; exit 1; }
    else
        echo "run-qemu.sh: $qemu not found: install the package qemu-system-x86" >&2
        exit 1
    fi
fi

timeout_s=${CODESPACE_QEMU_TIMEOUT:-120}
memory=${CODESPACE_QEMU_MEMORY:-512M}
smp=${CODESPACE_QEMU_SMP:-1}
if ! [[ "$smp" =~ ^[1-9][0-9]*$ ]]; then
    echo "run-qemu.sh: CODESPACE_QEMU_SMP=$smp is not a positive number of CPUs" >&2
    exit 2
fi

# KVM only when it really works here: /dev/kvm can exist and refuse us, or work so slowly (nested
# virtualization: ~30 s of firmware before the kernel runs) that TCG is faster. The probe boots
# this very kernel with `codespace.probe` (full init, 8 MiB of fresh memory touched, one line
# printed) and wants it back within 3 s; TCG does it in well under one.
# `-cpu host` fails on these machines; qemu64 plus NX works under both accelerators. The SSE
# flags are those precompiled wasm is compiled for (codespace-wasmtime/src/settings.rs,
# QEMU_CPU_FLAGS: keep them equal); the kernel checks them with CPUID before loading wasm.
cpu=qemu64,+nx,+ssse3,+sse4.1,+sse4.2,+popcnt
kvm_usable() {
    [ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
    timeout -k 1 3 "$qemu" -accel kvm -cpu "$cpu" -m "$memory" -nodefaults -display none \
        -monitor none -serial none -no-reboot -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
        -kernel "$kernel" -append codespace.probe </dev/null >/dev/null 2>&1
    [ $? -eq 33 ]
}
accel=${CODESPACE_QEMU_ACCEL:-}
if [ -z "$accel" ]; then
    cache="${TMPDIR:-/tmp}/codespace-qemu-accel-$(id -u)"
    if [ -f "$cache" ]; then
        accel=$(cat "$cache")
    else
        if kvm_usable; then accel=kvm; else accel=tcg; fi
        echo "$accel" > "$cache"
        echo "run-qemu.sh: accelerator $accel (probed once; cached in $cache)" >&2
    fi
fi

args=(
    -kernel "$kernel"
    -accel "$accel"
    -cpu "$cpu"
    -m "$memory"
    -smp "$smp"
    -serial stdio
    -display none
    -monitor none
    -no-reboot
    -device isa-debug-exit,iobase=0xf4,iosize=0x04
)
if [ -n "${CODESPACE_QEMU_MODULES:-}" ]; then
    args+=(-initrd "$CODESPACE_QEMU_MODULES")
fi
if [ -n "${CODESPACE_QEMU_APPEND:-}" ]; then
    args+=(-append "$CODESPACE_QEMU_APPEND")
fi

timeout --foreground -k 5 "$timeout_s" "$qemu" "${args[@]}" "$@" </dev/null
status=$?
case $status in
    33) exit 0 ;;
    35) exit 1 ;;
    124|137)
        echo "run-qemu.sh: timeout: kernel $kernel still running after ${timeout_s}s; killed" >&2
        exit 124 ;;
    0)
        echo "run-qemu.sh: kernel $kernel reset the machine without reporting a result (triple fault?)" >&2
        exit 1 ;;
    *)
        echo "run-qemu.sh: QEMU exited with status $status" >&2
        exit 1 ;;
esac
