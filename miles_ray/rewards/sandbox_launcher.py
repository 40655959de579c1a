"""The sandbox's launcher and init, run as ``python -I -S sandbox_launcher.py CONFIG`` by
:func:`miles_ray.rewards.sandbox.run_sandboxed` (stdlib only: ``-I`` puts no project on the path).

launcher: dies with its caller (PDEATHSIG), joins the pids cgroup, unshares user (SANDBOX_UID mapped
to the caller's uid, or to ``host_uid`` when the caller is root), network, pid, mount, ipc and uts
namespaces, forks init. init (pid 1 of the new pid namespace): builds the private root (tmpfs +
read-only binds, pivot_root), becomes SANDBOX_UID (a root caller's sandbox holds no host uid 0), sets
RLIMIT_NPROC, no_new_privs, Landlock and the seccomp filter (compiled by the caller with libseccomp),
forks the code (rlimits, empty environment, exec ``python -I -S``), waits for it and writes one JSON
line on the status pipe: exit code or signal, CPU time, and the protections that took effect with a
warning for each missing one. When init exits the kernel kills what is left in its pid namespace.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import resource
import select
import signal
import stat
import sys

PYTHON = os.path.realpath(sys.executable)  # the base interpreter, not a venv's wrapper
CODE_FLAGS = ["-I", "-S", "-B", "-X", "utf8"]  # isolated: no env vars, no site-packages, no .pyc
NS = {"user": 0x10000000, "network": 0x40000000, "pid": 0x20000000, "mount": 0x20000, "ipc": 0x08000000,
      "uts": 0x04000000}
MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_RDONLY, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 32, 1, 4096, 16384, 1 << 18
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
LL_CREATE, LL_ADD_RULE, LL_RESTRICT = 444, 445, 446  # same numbers on every architecture
LL_READ = 1 | 4 | 8  # EXECUTE | READ_FILE | READ_DIR
LL_FILE_RIGHTS = 1 | 2 | 4 | (1 << 14) | (1 << 15)  # rights a rule on a single file may carry
READ_ONLY_PATHS = ["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/etc/ld.so.cache"]
DEVICES = ["/dev/null", "/dev/zero", "/dev/urandom"]
SANDBOX_UID = 1000  # the code's uid inside its user namespace (not 0: exec drops every capability)
_libc = ctypes.CDLL(None, use_errno=True)


def _call(ret: int, what: str) -> int:
    if ret < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return ret


def _prctl(option: int, value: int) -> None:
    _call(_libc.prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
          "prctl")


def _mount(src, dst, fstype, flags, data=None) -> None:
    enc = [None if s is None else s.encode() for s in (src, dst, fstype, data)]
    _call(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {dst}")


def launcher(cfg: dict) -> None:
    """Joins the cgroup, unshares the namespaces, forks init and waits for it."""
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the caller
    if os.getppid() != cfg["ppid"]:
        os._exit(70)
    report = {"warnings": [], "process_limit": None}
    if cfg["uid"] == 0:
        os.setgroups([])  # no supplementary groups (root's would follow the code into its namespace)
    if cfg["cgroup"]:
        with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        report["process_limit"] = "cgroup_pids"
    flags = unshare_namespaces(cfg, report)
    report.update({f"{name}_namespace": bool(flags & bit) for name, bit in NS.items()})
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        init(cfg, report, alive_r)
    os.close(alive_r)
    os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) & 0x7F)


def unshare_namespaces(cfg: dict, report: dict) -> int:
    """New user (SANDBOX_UID mapped to the caller's uid), network, pid, mount, ipc and uts namespaces;
    the flags that took effect (0 with a warning when they cannot be made)."""
    if "namespaces" in cfg["off"]:
        report["warnings"].append("no namespaces (user, network, pid, mount, ipc, uts): switched off")
        return 0
    flags, (go_r, go_w) = sum(NS.values()), os.pipe()
    mapper = os.fork()
    if mapper == 0:  # stays in this namespace: mapping uid 0 needs CAP_SETFCAP here (verify_root_map)
        os.close(go_w)
        os._exit(0 if os.read(go_r, 1) == b"1" and write_id_maps(os.getppid(), *host_ids(cfg)) else 1)
    os.close(go_r)
    try:
        _call(_libc.unshare(flags), "unshare")
        os.write(go_w, b"1")
    except OSError as err:
        flags = 0
        report["warnings"].append(f"no namespaces (user, network, pid, mount, ipc, uts): {err}")
    os.close(go_w)
    if os.waitstatus_to_exitcode(os.waitpid(mapper, 0)[1]) != 0 and flags:
        os._exit(73)  # in a user namespace without an id map nothing works; reported as sandbox_error
    return flags


def host_ids(cfg: dict) -> tuple[int, int]:
    """The host uid/gid the sandbox runs as: the caller's own, or ``host_uid``/``host_gid`` (default
    nobody/nogroup) when the caller is root."""
    if cfg["uid"] != 0:
        return os.geteuid(), os.getegid()
    return cfg["limits"]["host_uid"], cfg["limits"]["host_gid"]


def write_id_maps(pid: int, uid: int, gid: int) -> bool:
    """Map SANDBOX_UID/GID inside ``pid``'s new user namespace to ``uid``/``gid`` on the host (another
    uid than this process's own needs CAP_SETUID here: a root caller)."""
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{SANDBOX_UID} {uid} 1"),
                           ("gid_map", f"{SANDBOX_UID} {gid} 1")):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(text)
        return True
    except OSError as err:
        os.write(2, f"sandbox: {err}\n".encode())
        return False


def init(cfg: dict, report: dict, alive_r: int) -> None:
    """Pid 1 of the sandbox: sets up, runs the code, reports its status and rusage, exits."""
    _prctl(1, signal.SIGKILL)
    if select.select([alive_r], [], [], 0)[0]:
        os._exit(71)  # the launcher died before PDEATHSIG was armed
    status_fd, cfg["alive_fd"] = cfg["status_fd"], alive_r
    os.set_inheritable(status_fd, False)
    try:
        run = setup(cfg, report)
    except Exception as err:  # noqa: BLE001 - reported to the caller as sandbox_error
        os.write(status_fd, json.dumps({"setup_error": f"{type(err).__name__}: {err}"}).encode() + b"\n")
        os._exit(72)
    pid = os.fork()
    if pid == 0:
        exec_code(cfg["limits"], *run)
    _, status, usage = os.wait4(pid, 0)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    reply = {"signal": sig, "code": None if sig else os.WEXITSTATUS(status), "protections": report,
             "cpu_s": round(usage.ru_utime + usage.ru_stime, 4), "maxrss_kb": usage.ru_maxrss}
    os.write(status_fd, json.dumps(reply).encode() + b"\n")
    os._exit(0)


def setup(cfg: dict, report: dict) -> tuple:
    """Private root (or the plain work folder), the process limit and Landlock, in that order."""
    limits, base = cfg["limits"], cfg["base"]
    stdin_fd = os.open(os.path.join(base, "stdin"), os.O_RDONLY)
    workdir, report["private_root"] = os.path.join(base, "work"), False
    if "private_root" in cfg["off"] or not report["mount_namespace"]:
        report["warnings"].append("no private root: the code sees this machine's files, Landlock permitting")
    else:
        try:
            workdir = private_root(base, limits["memory_mb"], lambda: become_sandbox_user(cfg, report))
            report["private_root"] = True
        except OSError as err:
            report["warnings"].append(f"no private root ({err}): the code sees this machine's files, Landlock permitting")
    if "host_uid" not in report:
        become_sandbox_user(cfg, report)
    nproc = limits["max_processes"] + 2  # + launcher and init, which share the count
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    if report["process_limit"] is None:  # counted per (user namespace, uid): each sandbox has its own budget
        report["process_limit"] = "rlimit_nproc"  # (the code is never host root: become_sandbox_user)
        if not report["user_namespace"]:
            report["warnings"].append("RLIMIT_NPROC without a user namespace: shared by every process of the "
                                      f"sandbox's host uid {report['host_uid']}")
    report.update(landlock(read_only_paths(), [workdir], DEVICES, report, "landlock" not in cfg["off"]))
    _prctl(4, 0)  # PR_SET_DUMPABLE 0: the code cannot ptrace init
    load_seccomp(cfg, report)
    return workdir, stdin_fd


def become_sandbox_user(cfg: dict, report: dict) -> None:
    """A root caller's sandbox drops host uid 0: SANDBOX_UID in the user namespace (mapped to
    ``host_uid``; capabilities in the namespace are kept for the rest of the set-up, and ``execve`` of
    the code drops them), or ``host_uid`` itself without a user namespace. Others run as the caller."""
    uid, gid = host_ids(cfg)
    report["host_uid"], report["host_gid"] = uid, gid
    if cfg["uid"] != 0:
        return
    if not report["user_namespace"]:
        os.setgroups([])
    else:
        uid = gid = SANDBOX_UID
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _prctl(1, signal.SIGKILL)  # a change of credentials clears PDEATHSIG: arm it again
    if select.select([cfg["alive_fd"]], [], [], 0)[0]:
        os._exit(71)  # the launcher died in between


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp(cfg: dict, report: dict) -> None:
    """Load the caller's BPF program (hex; ``struct sock_filter`` array) for this process and its
    children; needs no_new_privs (set by :func:`landlock`). Missing or failing: an error when
    ``require_seccomp``, else a warning."""
    program, report["seccomp"] = cfg.get("seccomp"), False
    why = cfg.get("seccomp_why") or "no filter given"
    if program:
        data = bytes.fromhex(program)
        buf = ctypes.create_string_buffer(data, len(data))
        prog = _SockFprog(len(data) // 8, ctypes.cast(buf, ctypes.c_void_p))
        ret = _libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(prog), ctypes.c_ulong(0), ctypes.c_ulong(0))
        if ret == 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
            report["seccomp"] = True
            return
        why = f"prctl(PR_SET_SECCOMP): {os.strerror(ctypes.get_errno())}"
    if cfg["limits"].get("require_seccomp", True) and "seccomp" not in cfg["off"]:
        raise OSError(f"no seccomp filter ({why}) and reward.sandbox.require_seccomp is true")
    report["warnings"].append(f"no seccomp filter ({why}): every syscall the kernel allows is open to the code")


def read_only_paths() -> list[str]:
    """The interpreter's installation and the shared libraries it loads."""
    paths = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(PYTHON)}
    for p in READ_ONLY_PATHS:
        if os.path.exists(p):
            paths.add(p)
            paths.add(os.path.realpath(p))
    return sorted(paths)


def private_root(base: str, size_mb: int, become_user) -> str:
    """A tmpfs of ``size_mb`` as the new root holding read-only binds of the interpreter and libraries,
    the devices in DEVICES and a writable /tmp with the code; pivot_root into it. The host paths are
    opened first (with the caller's uid, which may be the only one that reaches them), then
    ``become_user`` runs and everything else is made as the code's uid (a tmpfs mounted in a user
    namespace takes no file of an unmapped uid) and bound from ``/proc/self/fd``. Returns the workdir."""
    root = os.path.join(base, "root")
    os.mkdir(root)
    with open(os.path.join(base, "work", "main.py"), "rb") as f:
        code = f.read()
    sources = _open_sources(read_only_paths() + DEVICES)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={size_mb}m,mode=0755,uid={SANDBOX_UID},gid={SANDBOX_UID}")
    become_user()
    for path, (fd, link, is_dir, flags) in sources.items():
        dst = root + path
        if link is not None or not os.path.exists(dst):
            os.makedirs(dst if is_dir else os.path.dirname(dst), exist_ok=True)
        if link is not None:
            os.symlink(link, dst)
            continue
        if not is_dir and not os.path.exists(dst):
            open(dst, "w").close()
        _mount(f"/proc/self/fd/{fd}", dst, None, MS_BIND | MS_REC)
        os.close(fd)
        if path not in DEVICES:
            _mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NODEV | flags)
    os.mkdir(root + "/tmp", 0o700)
    with open(root + "/tmp/main.py", "wb") as f:
        f.write(code)
    os.chdir(root)
    number = PIVOT_ROOT.get(platform.machine())
    if number is None:
        os.chroot(".")
    else:
        _call(_libc.syscall(ctypes.c_long(number), b".", b"."), "pivot_root")
        _call(_libc.umount2(b".", 2), "umount old root")  # MNT_DETACH
    os.chdir("/")
    return "/tmp"


def _open_sources(paths: list) -> dict:
    """path -> (O_PATH fd or None, symlink target or None, is a directory, mount flags to keep)."""
    sources = {}
    for path in paths:
        if path in sources:
            continue
        if os.path.islink(path):
            sources[path] = (None, os.readlink(path), False, 0)
            continue
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        sources[path] = (fd, None, stat.S_ISDIR(os.fstat(fd).st_mode), _locked_flags(fd))
    return sources


def _locked_flags(path) -> int:
    """Mount flags a remount inside a user namespace must keep (nosuid, noexec, atime flags)."""
    have = os.statvfs(path).f_flag
    pairs = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NOEXEC, 8), (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048),
             (os.ST_RELATIME, 1 << 21))
    return MS_NOSUID | sum(ms for st, ms in pairs if have & st)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]


def landlock_abi() -> int:
    return max(_libc.syscall(ctypes.c_long(LL_CREATE), None, ctypes.c_long(0), ctypes.c_long(1)), 0)


def landlock(read: list, write: list, devices: list, report: dict, wanted: bool = True) -> dict:
    """Restrict this process and its children: read/execute ``read``, everything under ``write``,
    read/write ``devices``; no TCP bind/connect (ABI >= 4); no signals or abstract unix sockets
    outside the sandbox (ABI >= 6). Also sets no_new_privs."""
    abi = landlock_abi() if wanted else 0
    _prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
    done = {"landlock_abi": abi, "no_new_privs": True, "landlock_filesystem": abi >= 1,
            "landlock_network": abi >= 4, "landlock_signal_scope": abi >= 6}
    if abi < 1:
        report["warnings"].append("no Landlock: files are limited by the private root alone (if any), TCP by the network namespace alone")
        return done
    fs = (1 << {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)) - 1
    attr = _RulesetAttr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    ruleset = _call(_libc.syscall(ctypes.c_long(LL_CREATE), ctypes.byref(attr),
                                  ctypes.c_long(8 if abi < 4 else 16 if abi < 6 else 24), ctypes.c_long(0)),
                    "landlock_create_ruleset")
    try:
        for paths, access in ((read, LL_READ), (write, fs), (devices, 2 | 4 | (1 << 14) | (1 << 15))):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                allowed = access & fs & (fs if stat.S_ISDIR(os.fstat(fd).st_mode) else LL_FILE_RIGHTS)
                rule = _PathBeneath(allowed, fd)
                ret = _libc.syscall(ctypes.c_long(LL_ADD_RULE), ctypes.c_long(ruleset), ctypes.c_long(1),
                                    ctypes.byref(rule), ctypes.c_long(0))
                os.close(fd)
                _call(ret, f"landlock_add_rule {path}")
        _call(_libc.syscall(ctypes.c_long(LL_RESTRICT), ctypes.c_long(ruleset), ctypes.c_long(0)),
              "landlock_restrict_self")
    finally:
        os.close(ruleset)
    if abi < 4:
        report["warnings"].append(f"Landlock ABI {abi}: no TCP or signal scoping from Landlock")
    elif abi < 6:
        report["warnings"].append(f"Landlock ABI {abi}: no signal scoping from Landlock")
    return done


def exec_code(limits: dict, workdir: str, stdin_fd: int) -> None:
    """The code's process: stdin, rlimits, empty environment, exec the interpreter."""
    try:
        _prctl(1, signal.SIGKILL)
        os.dup2(stdin_fd, 0)
        cpu = math.ceil(limits["cpu_s"])
        memory = limits["memory_mb"] << 20
        for res, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (memory, memory)),
                           (resource.RLIMIT_FSIZE, (memory, memory)), (resource.RLIMIT_NOFILE, (64, 64)),
                           (resource.RLIMIT_CORE, (0, 0))):
            resource.setrlimit(res, value)
        os.chdir(workdir)
        os.execve(PYTHON, [PYTHON, *CODE_FLAGS, os.path.join(workdir, "main.py")],
                  {"HOME": workdir, "TMPDIR": workdir, "PATH": "/usr/bin:/bin"})
    except BaseException as err:  # noqa: BLE001 - reported on the code's stderr
        os.write(2, f"sandbox: could not start the code: {type(err).__name__}: {err}\n".encode())
    finally:
        os._exit(127)


if __name__ == "__main__":
    launcher(json.loads(sys.argv[1]))
