"""The sandbox's seccomp filter, compiled by libseccomp (PyPI ``pyseccomp``, a ctypes binding of
``libseccomp.so.2``) in the reward process and loaded as raw BPF by the sandbox's init
(:func:`miles_ray.rewards.sandbox_launcher.load_seccomp`, stdlib only) after its own namespace and
mount set-up, so the code and everything it starts run under it.

Default action: allow. Denied with ``EPERM`` (the program sees an ordinary ``PermissionError``):
namespace creation and entry, the mount API, io_uring, keyrings, bpf, ptrace and process memory
access, perf events, userfaultfd, memfd, SysV/POSIX IPC objects, module/kexec/reboot-class calls, and
``socket()`` of any family but AF_UNIX/AF_INET/AF_INET6 or of type SOCK_RAW (or SOCK_PACKET). ``clone3`` answers
``ENOSYS`` (its flags sit in a struct a filter cannot read; glibc then falls back to ``clone``, whose
flags are checked). Syscalls of another ABI (32-bit ``int 0x80``, x32) kill the process: libseccomp's
bad-architecture action. docs/sandbox.md lists what this does and does not cover.
"""
from __future__ import annotations

import errno
import functools
import tempfile

CLONE_NEW = {"newns": 0x20000, "newcgroup": 0x02000000, "newuts": 0x04000000, "newipc": 0x08000000,
             "newuser": 0x10000000, "newpid": 0x20000000, "newnet": 0x40000000}
CLONE_NEWTIME = 0x80  # unshare only: in clone's flags these bits are the exit signal
AF_UNIX, AF_INET, AF_INET6, SOCK_RAW, SOCK_PACKET, SOCK_TYPE_MASK = 1, 2, 10, 3, 10, 0xF
DENIED = (
    # namespaces and mounts (the sandbox's own set-up is done before the filter is loaded)
    "setns", "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr",
    # kernel attack surface with a history of privilege escalations
    "io_uring_setup", "io_uring_enter", "io_uring_register", "add_key", "request_key", "keyctl", "bpf",
    "perf_event_open", "userfaultfd", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "name_to_handle_at", "open_by_handle_at", "fanotify_init", "lookup_dcookie", "quotactl",
    # memory the address-space limit does not count
    "memfd_create", "memfd_secret", "shmget", "shmat", "msgget", "semget", "mq_open",
    # privileged anyway (no capability in the host's namespace); denied for defence in depth
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon",
    "swapoff", "acct", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "syslog", "vhangup",
    "iopl", "ioperm", "uselib",
)


class SeccompUnavailable(RuntimeError):
    """No seccomp filter can be built here (libseccomp or its binding missing, or a libseccomp error)."""


def _binding():
    try:
        import pyseccomp
    except ImportError as err:
        raise SeccompUnavailable(f"the Python binding is missing ({err}): run scripts/setup.sh "
                                 "(pip install pyseccomp)") from None
    except (OSError, RuntimeError) as err:  # the binding loads libseccomp.so.2 at import
        raise SeccompUnavailable(f"libseccomp could not be loaded ({err}): apt-get install -y libseccomp2") from None
    return pyseccomp


def _deny_names(sc, filt, arch: int) -> list[str]:
    names = []
    for name in DENIED:
        if sc.resolve_syscall(arch, name) < 0:
            continue  # not a syscall on this architecture (or unknown to this libseccomp)
        filt.add_rule(sc.ERRNO(errno.EPERM), name)
        names.append(name)
    return names


def _deny_namespace_flags(sc, filt) -> None:
    """clone/unshare with any CLONE_NEW* bit: one masked rule per bit (any one set denies)."""
    for bit in CLONE_NEW.values():
        for name in ("clone", "unshare"):
            filt.add_rule(sc.ERRNO(errno.EPERM), name, sc.Arg(0, sc.MASKED_EQ, bit, bit))
    filt.add_rule(sc.ERRNO(errno.EPERM), "unshare", sc.Arg(0, sc.MASKED_EQ, CLONE_NEWTIME, CLONE_NEWTIME))
    filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")


def _deny_sockets(sc, filt) -> None:
    """socket(): only AF_UNIX, AF_INET, AF_INET6 (not AF_NETLINK, AF_PACKET, AF_ALG, AF_VSOCK, ...), never SOCK_RAW
    (nor the obsolete SOCK_PACKET).
    Compared on the full 64-bit register, so high bits cannot smuggle a family past the rule."""
    filt.add_rule(sc.ERRNO(errno.EPERM), "socket", sc.Arg(0, sc.GT, AF_INET6))
    for family in range(AF_INET6):
        if family not in (AF_UNIX, AF_INET):
            filt.add_rule(sc.ERRNO(errno.EPERM), "socket", sc.Arg(0, sc.EQ, family))
    for kind in (SOCK_RAW, SOCK_PACKET):
        filt.add_rule(sc.ERRNO(errno.EPERM), "socket", sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, kind))


@functools.lru_cache(maxsize=1)
def _compiled() -> tuple[bytes, tuple[str, ...]]:
    sc = _binding()
    try:
        filt = sc.SyscallFilter(sc.ALLOW)
        names = _deny_names(sc, filt, sc.system_arch())
        _deny_namespace_flags(sc, filt)
        _deny_sockets(sc, filt)
        with tempfile.TemporaryFile() as f:
            filt.export_bpf(f)
            f.seek(0)
            program = f.read()
    except OSError as err:
        raise SeccompUnavailable(f"libseccomp could not build the filter: {err}") from None
    if not program or len(program) % 8:
        raise SeccompUnavailable(f"libseccomp exported {len(program)} bytes, not a BPF program")
    return program, tuple(names)


def filter_program() -> bytes:
    """The BPF program (``struct sock_filter`` array, native byte order) to load in the sandbox.
    Raises :class:`SeccompUnavailable` with the reason and the fix."""
    return _compiled()[0]


def denied_syscalls() -> tuple[str, ...]:
    """The syscalls denied outright on this architecture (besides clone/unshare flags, socket families)."""
    return _compiled()[1]


def clear_cache() -> None:
    """Build the filter again on the next call (tests that hide or restore the binding)."""
    _compiled.cache_clear()
