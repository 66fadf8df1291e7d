"""What the seccomp filter allows: the base allowlist, named groups and
dangerous options, as data. Private; compiled by ``_seccomp``.

A rule is ``None`` (allowed whatever the arguments; such syscalls hit the
kernel's action cache) or a list of alternatives, each a list of argument
tests that must all hold. Every test compares only the LOW 32-bit word of an
argument unless ``hi`` is set: the kernel truncates ``int``/``unsigned int``
arguments (fds, ioctl and fcntl commands, socket families, clone flags,
pids), so a 64-bit compare could be bypassed with junk in the high word.
"""

from __future__ import annotations

from dataclasses import dataclass

PID = -1  # placeholder for the worker's pid, patched into the BPF at entry


@dataclass(frozen=True)
class Cond:
    arg: int
    value: int  # compared after masking; PID means "the worker's own pid"
    mask: int = 0xFFFFFFFF
    op: str = "eq"  # "eq" or "lt" (unsigned, low word)
    hi: bool = False  # test the high word instead


Rule = list[list[Cond]] | None

# --- constants (KERNEL-FACTS) ---
PROT_EXEC = 0x4
AT_EMPTY_PATH = 0x1000
AF_UNIX = 1
SOCK_STREAM = 1
SOCK_SEQPACKET = 5
MFD_EXEC = 0x10
O_APPEND = 0x400
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_THREAD, CLONE_SYSVSEM, CLONE_SETTLS = 0x10000, 0x40000, 0x80000
CLONE_PARENT_SETTID, CLONE_CHILD_CLEARTID, CLONE_DETACHED = 0x100000, 0x200000, 0x400000
CLONE_CHILD_SETTID = 0x1000000
CSIGNAL = 0xFF
THREAD_FLAGS = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD
THREAD_OPTIONAL = (CLONE_SYSVSEM | CLONE_SETTLS | CLONE_PARENT_SETTID | CLONE_CHILD_CLEARTID | CLONE_CHILD_SETTID
                   | CLONE_DETACHED)
FORK_OPTIONAL = CSIGNAL | CLONE_PARENT_SETTID | CLONE_CHILD_CLEARTID | CLONE_CHILD_SETTID

# ioctl commands allowed on any held fd (low 32 bits). TIOCSTI (0x5412),
# TIOCLINUX, TIOCSCTTY, FIOASYNC and all seccomp/landlock ioctls are absent.
IOCTLS = {
    "TCGETS": 0x5401,  # isatty(): io.open() probes every file with it
    "TIOCGWINSZ": 0x5413,
    "FIONREAD": 0x541B,
    "FIONBIO": 0x5421,  # how CPython sets sockets non-blocking
    "FIONCLEX": 0x5450,
    "FIOCLEX": 0x5451,
}
# fcntl commands. F_SETFL is allowed only with O_APPEND in the new flags, so a
# worker can never clear O_APPEND on an append-only grant (set O_NONBLOCK on
# sockets with FIONBIO instead). No F_SETOWN/F_SETSIG/F_SETLEASE/F_NOTIFY
# (signals or notifications to other processes), no locks (they reach the
# broker's files).
FCNTLS = {"F_DUPFD": 0, "F_GETFD": 1, "F_SETFD": 2, "F_GETFL": 3, "F_DUPFD_CLOEXEC": 1030, "F_GETPIPE_SZ": 1032,
          "F_ADD_SEALS": 1033, "F_GET_SEALS": 1034}
F_SETFL = 4
# prctl options that only read state or name the thread.
PRCTLS = {"PR_GET_PDEATHSIG": 2, "PR_GET_DUMPABLE": 3, "PR_GET_KEEPCAPS": 7, "PR_SET_NAME": 15, "PR_GET_NAME": 16,
          "PR_GET_SECCOMP": 21, "PR_CAPBSET_READ": 23, "PR_GET_TIMERSLACK": 30, "PR_GET_NO_NEW_PRIVS": 39,
          "PR_GET_THP_DISABLE": 42, "PR_SET_VMA": 0x53564D41}
PR_SET_DUMPABLE = 4
ARCH_PRCTLS = {"ARCH_SET_GS": 0x1001, "ARCH_SET_FS": 0x1002, "ARCH_GET_FS": 0x1003, "ARCH_GET_GS": 0x1004}
MADV_LIMIT = 26  # MADV_NORMAL..MADV_COLLAPSE; keeps out MADV_HWPOISON (100) / SOFT_OFFLINE (101)


def _one_of(arg: int, values: dict[str, int] | list[int]) -> list[list[Cond]]:
    vals = values.values() if isinstance(values, dict) else values
    return [[Cond(arg, v)] for v in vals]


_NO_EXEC_PROT = [[Cond(2, 0, mask=PROT_EXEC)]]
_FD_NONNEG = Cond(0, 0, mask=0x80000000)  # dirfd >= 0 as an int: AT_FDCWD (-100) and other negatives denied
_SELF = [[Cond(0, PID)]]
_UNIX_SOCK = [[Cond(0, AF_UNIX), Cond(1, SOCK_STREAM, mask=0xF)], [Cond(0, AF_UNIX), Cond(1, SOCK_SEQPACKET, mask=0xF)]]

BASE: dict[str, Rule] = {
    # memory
    **dict.fromkeys(["brk", "munmap", "mremap", "msync", "mincore", "membarrier"]),
    "mmap": _NO_EXEC_PROT,
    "mprotect": _NO_EXEC_PROT,
    "pkey_mprotect": _NO_EXEC_PROT,
    "madvise": [[Cond(2, MADV_LIMIT, op="lt")]],
    # threads: clone only with the thread flags glibc uses; clone3 -> ENOSYS (see ERRNO)
    "clone": [[Cond(0, THREAD_FLAGS, mask=0xFFFFFFFF & ~THREAD_OPTIONAL)]],
    **dict.fromkeys(["futex", "set_robust_list", "set_tid_address", "rseq", "sched_yield", "exit", "exit_group",
                     "restart_syscall"]),
    "arch_prctl": _one_of(0, ARCH_PRCTLS),
    "prctl": [*_one_of(0, PRCTLS), [Cond(0, PR_SET_DUMPABLE), Cond(1, 0), Cond(1, 0, hi=True)]],
    "sched_getaffinity": [[Cond(0, 0)]],
    # time
    **dict.fromkeys(["clock_gettime", "clock_getres", "gettimeofday", "time", "nanosleep", "clock_nanosleep",
                     "getitimer", "setitimer", "alarm", "timer_create", "timer_settime", "timer_gettime",
                     "timer_getoverrun", "timer_delete", "timerfd_create", "timerfd_settime", "timerfd_gettime",
                     "times", "getrusage"]),
    # signals: handlers and masks freely, delivery only to this process
    **dict.fromkeys(["rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "rt_sigpending",
                     "rt_sigtimedwait", "rt_sigsuspend", "pause", "signalfd4"]),
    "kill": _SELF,
    "tkill": _SELF,
    "tgkill": _SELF,
    "rt_sigqueueinfo": _SELF,
    "rt_tgsigqueueinfo": _SELF,
    # identity (read-only)
    **dict.fromkeys(["getpid", "gettid", "getppid", "getpgrp", "getuid", "geteuid", "getgid", "getegid",
                     "getgroups", "getresuid", "getresgid", "uname", "sysinfo", "umask", "getrandom",
                     "getrlimit", "setrlimit"]),  # setrlimit can only lower the hard limit
    "prlimit64": [[Cond(0, 0)], [Cond(0, PID)]],
    # I/O on fds already held
    **dict.fromkeys(["read", "write", "pread64", "pwrite64", "readv", "writev", "preadv", "pwritev", "preadv2",
                     "pwritev2", "lseek", "close", "close_range", "dup", "dup2", "dup3", "fstat", "fstatfs",
                     "fsync", "fdatasync", "ftruncate", "fallocate", "fadvise64", "getdents64",
                     "pipe", "pipe2", "eventfd", "eventfd2",
                     "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl",
                     "epoll_wait", "epoll_pwait", "epoll_pwait2"]),
    # fstat() in glibc is newfstatat(fd, "", AT_EMPTY_PATH); relative path walks need @fs-at
    "newfstatat": [[_FD_NONNEG, Cond(3, AT_EMPTY_PATH, mask=AT_EMPTY_PATH)]],
    "statx": [[_FD_NONNEG, Cond(2, AT_EMPTY_PATH, mask=AT_EMPTY_PATH)]],
    "ioctl": _one_of(1, IOCTLS),
    "fcntl": [*_one_of(1, FCNTLS), [Cond(1, F_SETFL), Cond(2, O_APPEND, mask=O_APPEND)]],
    "memfd_create": [[Cond(1, 0, mask=MFD_EXEC)]],
    # sockets: only AF_UNIX stream/seqpacket (no datagrams: sendto a path needs none)
    **dict.fromkeys(["sendmsg", "recvmsg", "sendto", "recvfrom", "sendmmsg", "recvmmsg", "shutdown",
                     "getsockname", "getpeername", "getsockopt"]),
    "socket": _UNIX_SOCK,
    "socketpair": _UNIX_SOCK,
}

# Syscalls answered with a fixed errno instead of the default action.
ENOSYS = 38
ERRNO: dict[str, int] = {"clone3": ENOSYS}  # glibc falls back to clone(), whose flags we can check

# Named groups a policy may add. None may contain an ALWAYS_DENIED syscall
# (checked at import and by a test).
GROUPS: dict[str, dict[str, Rule]] = {
    # Path walks relative to held directory fds (never AT_FDCWD or any negative
    # fd). Landlock confines where they reach, so entry fails closed without it.
    "@fs-at": {
        name: [[_FD_NONNEG]]
        for name in ["openat", "openat2", "newfstatat", "statx", "mkdirat", "mknodat", "unlinkat", "renameat",
                     "renameat2", "linkat", "symlinkat"]
    },
    # Metadata changes on held fds only (Landlock does not cover chmod/chown/utime).
    "@fd-metadata": {
        "fchmod": None,
        "fchown": None,
        "utimensat": [[_FD_NONNEG, Cond(1, 0), Cond(1, 0, hi=True)]],  # path == NULL: the fd itself
    },
    "@splice": dict.fromkeys(["splice", "tee", "vmsplice", "sendfile", "copy_file_range"]),
    "@memlock": dict.fromkeys(["mlock", "mlock2", "munlock", "mlockall", "munlockall"]),  # RLIMIT_MEMLOCK bounds it
    "@sched": {"sched_setaffinity": [[Cond(0, 0)]], "sched_getparam": [[Cond(0, 0)]],
               "sched_getscheduler": [[Cond(0, 0)]], "getpriority": None, "setpriority": [[Cond(1, 0)]]},
    "@flock": dict.fromkeys(["flock"]),
}
GROUPS_NEED_LANDLOCK = frozenset({"@fs-at"})

# Named options that loosen what is otherwise denied. Each maps to the rules it
# replaces or adds.
DANGEROUS: dict[str, dict[str, Rule]] = {
    # JITs (PROT_EXEC mappings). Lets injected machine code persist as code.
    "allow-exec-mappings": dict.fromkeys(["mmap", "mprotect", "pkey_mprotect"]),
    # Child processes (no namespace flags, no ptrace); children inherit the sandbox.
    "allow-fork": {
        "clone": [[Cond(0, 0, mask=0xFFFFFFFF & ~FORK_OPTIONAL)]],
        "fork": None,
        "vfork": None,
        "wait4": None,
        "waitid": None,
    },
}

# Never allowed by a group; only a dangerous option may touch them (none does
# today). Everything else not allowed hits the default action too.
ALWAYS_DENIED = frozenset(
    [
        "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "io_uring_setup", "io_uring_enter",
        "io_uring_register", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key", "personality",
        "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount",
        "fspick", "mount_setattr", "open_tree_attr", "unshare", "setns", "clone3", "modify_ldt", "kcmp", "pidfd_getfd",
        "pidfd_open", "pidfd_send_signal", "open_by_handle_at", "name_to_handle_at", "seccomp", "kexec_load",
        "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "iopl",
        "ioperm", "acct", "quotactl", "syslog", "uselib", "lookup_dcookie", "process_madvise", "process_mrelease",
        "fanotify_init", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
        "vhangup", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid", "setfsgid",
        "setgroups", "capset", "set_mempolicy", "mbind", "migrate_pages", "move_pages", "get_robust_list", "listmount",
        "statmount", "lsm_set_self_attr",
    ]
)


def _check_groups() -> None:
    for group_name, rules in GROUPS.items():
        bad = ALWAYS_DENIED.intersection(rules)
        if bad:
            raise AssertionError(f"group {group_name} would allow always-denied {sorted(bad)}")
    bad = ALWAYS_DENIED.intersection(BASE)
    if bad:
        raise AssertionError(f"base allowlist contains always-denied {sorted(bad)}")


_check_groups()
