"""What the seccomp filter allows: the base allowlist, named groups and
dangerous options, as data. Private; compiled by ``_seccomp``.

A rule is ``None`` (allowed whatever the arguments; such syscalls hit the
kernel's action cache) or a list of alternatives, each a list of argument
tests that must all hold (``[]``, no alternative, denies). Every test compares
only the LOW 32-bit word of an argument unless ``hi`` is set: the kernel
truncates ``int``/``unsigned int`` arguments (fds, ioctl and fcntl commands,
socket families, clone flags, pids), so a 64-bit compare could be bypassed
with junk in the high word.

The second half of this file is the per-fd part: rights pinned to the fd
numbers a worker holds at entry (``SandboxSpec.fd_rules``). Linux keeps no
rights mask per fd, so the filter keys on the number: :func:`pinned_rule`
says what a syscall may do on pinned fd N holding rights R, and the slot
itself can never be freed or replaced (close/dup2/dup3/close_range onto N).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from protocol import Rights

PID = -1  # placeholder for the worker's pid, patched into the BPF at entry


@dataclass(frozen=True)
class Cond:
    arg: int
    value: int  # compared after masking; PID means "the worker's own pid"
    mask: int = 0xFFFFFFFF
    op: str = "eq"  # "eq", "ne" or "lt" (unsigned)
    hi: bool = False  # test the high word instead


Rule = list[list[Cond]] | None

# --- constants (KERNEL-FACTS) ---
PROT_EXEC = 0x4
AT_EMPTY_PATH = 0x1000
AF_UNIX = 1
SOCK_STREAM = 1
SOCK_SEQPACKET = 5
O_APPEND = 0x400
O_ASYNC, O_DIRECT, O_NOATIME = 0x2000, 0x4000, 0x40000  # the status flags F_SETFL sets besides O_APPEND, O_NONBLOCK
PROT_WRITE = 0x2
MAP_SHARED = 0x01  # bit 0 is set in MAP_SHARED and MAP_SHARED_VALIDATE (0x03): both write through to the file
MAP_ANONYMOUS = 0x20
RENAME_WHITEOUT = 0x4
RWF_NOAPPEND = 0x20  # pwritev2 flag (6.9+): write at the given offset even on an O_APPEND fd
# membarrier commands that reach beyond the worker: GLOBAL (a grace period of the whole system's RCU per
# call) and GLOBAL_EXPEDITED with its registration (IPIs to every CPU running a registered process)
MEMBARRIER_GLOBAL = 0x1 | 0x2 | 0x4
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
F_DUPFD, F_DUPFD_CLOEXEC = 0, 1030
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
# sockets with FIONBIO instead), and never with O_DIRECT, O_NOATIME or O_ASYNC
# (without FCNTL): status flags are the open file's, which the broker and other
# workers share (O_DIRECT made their reads fail with EINVAL; red-team round
# 35). O_NONBLOCK changes nothing of a regular file. No F_SETOWN/F_SETSIG/F_SETLEASE/F_NOTIFY
# (signals or notifications to other processes), no locks (they reach the
# broker's files).
FCNTLS = {"F_DUPFD": 0, "F_GETFD": 1, "F_SETFD": 2, "F_GETFL": 3, "F_DUPFD_CLOEXEC": 1030, "F_GETPIPE_SZ": 1032,
          "F_ADD_SEALS": 1033, "F_GET_SEALS": 1034}
F_SETFL = 4
_SETFL_KEEPS_APPEND = [Cond(1, F_SETFL), Cond(2, O_APPEND, mask=O_APPEND)]
# O_APPEND among the new flags, and none of the three that FCNTL alone may set
_SETFL_PLAIN = [Cond(1, F_SETFL), Cond(2, O_APPEND, mask=O_APPEND | O_ASYNC | O_DIRECT | O_NOATIME)]
# Record locks: only on a pinned fd holding FLOCK (Capsicum's CAP_FLOCK covers them too).
LOCK_FCNTLS = {"F_GETLK": 5, "F_SETLK": 6, "F_SETLKW": 7, "F_OFD_GETLK": 36, "F_OFD_SETLK": 37, "F_OFD_SETLKW": 38}
# prctl options that only read state or name the thread.
PRCTLS = {"PR_GET_PDEATHSIG": 2, "PR_GET_DUMPABLE": 3, "PR_GET_KEEPCAPS": 7, "PR_SET_NAME": 15, "PR_GET_NAME": 16,
          "PR_GET_SECCOMP": 21, "PR_CAPBSET_READ": 23, "PR_GET_TIMERSLACK": 30, "PR_GET_NO_NEW_PRIVS": 39,
          "PR_GET_THP_DISABLE": 42, "PR_SET_VMA": 0x53564D41}
PR_SET_DUMPABLE = 4
ARCH_PRCTLS = {"ARCH_SET_GS": 0x1001, "ARCH_SET_FS": 0x1002, "ARCH_GET_FS": 0x1003, "ARCH_GET_GS": 0x1004}
PRIO_PROCESS = 0
MADV_LIMIT = 26  # MADV_NORMAL..MADV_COLLAPSE; keeps out MADV_HWPOISON (100) / SOFT_OFFLINE (101)


def _one_of(arg: int, values: dict[str, int] | list[int]) -> list[list[Cond]]:
    vals = values.values() if isinstance(values, dict) else values
    return [[Cond(arg, v)] for v in vals]


_NO_EXEC_PROT = [[Cond(2, 0, mask=PROT_EXEC)]]
_ANON = Cond(3, MAP_ANONYMOUS, mask=MAP_ANONYMOUS)
_NULL_ARG1 = [Cond(1, 0), Cond(1, 0, hi=True)]  # a pointer: both words
_FD_NONNEG = Cond(0, 0, mask=0x80000000)  # dirfd >= 0 as an int: AT_FDCWD (-100) and other negatives denied
_SELF = [[Cond(0, PID)]]
# Clocks: the static ids (0..11), this process's and its threads' CPU clocks. A process CPU clock id
# names any pid ((~pid << 3) | which, negative), and the kernel reads any process's CPU time through
# it with no permission check (a red team read the broker's and a sibling worker's to the ns). The
# pid field 0 (-8..-1) means this process; a per-thread clock (bit 2) the kernel holds to this
# thread group itself. (CLOCKFD ids, for PTP devices a worker never holds, are denied with the rest.)
MAX_STATIC_CLOCK = 12
_OWN_CLOCKS = [[Cond(0, MAX_STATIC_CLOCK, op="lt")], [Cond(0, 0xFFFFFFF8, mask=0xFFFFFFF8)],
               [Cond(0, 0x80000004, mask=0x80000004)]]
# futex operations (the low 7 bits of its op; PRIVATE and CLOCK_REALTIME are flags above them) but the
# PI ones: FUTEX_LOCK_PI on a word holding any tid said whether that task exists on the host (ESRCH,
# ETIMEDOUT, EPERM), the broker's threads and other workers' included. glibc and CPython use no PI
# futex unless asked for PTHREAD_PRIO_INHERIT.
FUTEX_CMD_MASK = 0x7F
FUTEX_OPS = {"FUTEX_WAIT": 0, "FUTEX_WAKE": 1, "FUTEX_REQUEUE": 3, "FUTEX_CMP_REQUEUE": 4, "FUTEX_WAKE_OP": 5,
             "FUTEX_WAIT_BITSET": 9, "FUTEX_WAKE_BITSET": 10}
_UNIX_SOCK = [[Cond(0, AF_UNIX), Cond(1, SOCK_STREAM, mask=0xF)], [Cond(0, AF_UNIX), Cond(1, SOCK_SEQPACKET, mask=0xF)]]

BASE: dict[str, Rule] = {
    # memory
    **dict.fromkeys(["brk", "munmap", "mremap", "msync", "mincore"]),
    "membarrier": [[Cond(0, 0, mask=MEMBARRIER_GLOBAL)]],  # QUERY and the commands on its own threads
    # anonymous memory only: a file mapping needs a pinned fd holding MMAP_R (see pinned_rule). CPython and
    # glibc map no file after entry (imports and dlopen would need open-by-path, which is denied anyway).
    "mmap": [[_ANON, Cond(2, 0, mask=PROT_EXEC)]],
    "mprotect": _NO_EXEC_PROT,
    "pkey_mprotect": _NO_EXEC_PROT,
    "madvise": [[Cond(2, MADV_LIMIT, op="lt")]],
    # threads: clone only with the thread flags glibc uses; clone3 -> ENOSYS (see ERRNO)
    "clone": [[Cond(0, THREAD_FLAGS, mask=0xFFFFFFFF & ~THREAD_OPTIONAL)]],
    "futex": [[Cond(1, v, mask=FUTEX_CMD_MASK)] for v in FUTEX_OPS.values()],
    **dict.fromkeys(["set_robust_list", "set_tid_address", "rseq", "sched_yield", "exit", "exit_group",
                     "restart_syscall"]),
    "arch_prctl": _one_of(0, ARCH_PRCTLS),
    "prctl": [*_one_of(0, PRCTLS), [Cond(0, PR_SET_DUMPABLE), Cond(1, 0), Cond(1, 0, hi=True)]],
    "sched_getaffinity": [[Cond(0, 0)]],
    # time
    **dict.fromkeys(["clock_gettime", "clock_getres", "clock_nanosleep", "timer_create"], _OWN_CLOCKS),
    **dict.fromkeys(["gettimeofday", "time", "nanosleep", "getitimer", "setitimer", "alarm", "timer_settime",
                     "timer_gettime",
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
    # I/O on fds already held. fsync, fdatasync, sync_file_range and fstatfs are absent: they are allowed
    # only on a pinned fd holding FSYNC / FSTATFS, so a grant made later can never carry those rights.
    **dict.fromkeys(["read", "write", "pread64", "pwrite64", "readv", "writev", "preadv", "pwritev", "preadv2",
                     "lseek", "close", "close_range", "dup", "dup2", "dup3", "fstat", "ftruncate",
                     "fadvise64", "getdents64",
                     "pipe", "pipe2", "eventfd", "eventfd2",
                     "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl",
                     "epoll_wait", "epoll_pwait", "epoll_pwait2"]),
    # RWF_NOAPPEND would write at any offset of an O_APPEND fd (verified on 6.18)
    "pwritev2": [[Cond(5, 0, mask=RWF_NOAPPEND)]],
    # plain preallocation (mode 0) only, which the kernel holds to RLIMIT_FSIZE. FALLOC_FL_KEEP_SIZE allocates
    # blocks past EOF without changing the size, so the kernel skips that check (a worker could fill the disk
    # past Limits.file_size); punch/collapse/zero/insert ranges rewrite or shrink the file (Landlock's TRUNCATE
    # right does not cover fallocate). Every mode but 0 needs a pinned fd holding FTRUNCATE (PINNED_EXTRA).
    "fallocate": [[Cond(1, 0)]],
    # fstat() in glibc is newfstatat(fd, "", AT_EMPTY_PATH). AT_EMPTY_PATH with a path given walks it: a
    # stat relative to any held directory fd (Landlock does not cover stat: README, "not enforced")
    "newfstatat": [[_FD_NONNEG, Cond(3, AT_EMPTY_PATH, mask=AT_EMPTY_PATH)]],
    "statx": [[_FD_NONNEG, Cond(2, AT_EMPTY_PATH, mask=AT_EMPTY_PATH)]],
    "ioctl": _one_of(1, IOCTLS),
    "fcntl": [*_one_of(1, FCNTLS), _SETFL_PLAIN],
    # (no memfd_create: each memfd is memory outside RLIMIT_AS; the wire's large values go into the
    # one BlobRegion made before entry, protocol/_wire.py)
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
    # Path walks relative to held directory fds: every dirfd argument, never AT_FDCWD or any negative fd.
    # seccomp cannot read a path, so an absolute one passes through any held fd: Landlock confines where
    # they reach (and the empty root), so entry fails closed without it.
    "@fs-at": {
        **{name: [[_FD_NONNEG]]
           for name in ["openat", "openat2", "newfstatat", "statx", "mkdirat", "mknodat", "unlinkat"]},
        # (olddirfd, oldpath, newdirfd, newpath): the second dirfd passed unchecked (a claims audit)
        **{name: [[_FD_NONNEG, Cond(2, 0, mask=0x80000000)]] for name in ["renameat", "linkat"]},
        # RENAME_WHITEOUT leaves a character device (0:0) where the source was, which Landlock does not
        # check against MAKE_CHAR (red-team round 43); RENAME_EXCHANGE Landlock checks both ways
        "renameat2": [[_FD_NONNEG, Cond(2, 0, mask=0x80000000), Cond(4, 0, mask=RENAME_WHITEOUT)]],
        # (target, newdirfd, linkpath): arg 0 is the target's pointer, which passed for an address below 2 GiB
        "symlinkat": [[Cond(1, 0, mask=0x80000000)]],
    },
    # Metadata changes on held fds only (Landlock does not cover chmod/chown/utime). Opens them for EVERY fd
    # not pinned at entry: FCHMOD/FCHOWN/FUTIMES are then no longer enforced per fd (GROUPS_WEAKEN).
    # Pinned fds keep them: the per-fd prefix still denies a pinned fd lacking the right.
    "@fd-metadata": {
        "fchmod": None,
        "fchown": None,
        "utimensat": [[_FD_NONNEG, Cond(1, 0), Cond(1, 0, hi=True)]],  # path == NULL: the fd itself
    },
    "@splice": dict.fromkeys(["splice", "tee", "vmsplice", "sendfile", "copy_file_range"]),
    "@memlock": dict.fromkeys(["mlock", "mlock2", "munlock", "mlockall", "munlockall"]),  # RLIMIT_MEMLOCK bounds it
    # getpriority/setpriority on this process alone (PRIO_PROCESS 0): with who == 0 PRIO_USER means
    # every process of the caller's uid (a red-team worker reniced the broker, the zygote and every
    # sibling to 19), and any pid or uid read back said whether it exists (a host-wide pid oracle).
    "@sched": {"sched_setaffinity": [[Cond(0, 0)]], "sched_getparam": [[Cond(0, 0)]],
               "sched_getscheduler": [[Cond(0, 0)]], "getpriority": [[Cond(0, PRIO_PROCESS), Cond(1, 0)]],
               "setpriority": [[Cond(0, PRIO_PROCESS), Cond(1, 0)]]},
    "@flock": dict.fromkeys(["flock"]),  # every unpinned fd: FLOCK no longer enforced per fd (GROUPS_WEAKEN)
}
GROUPS_NEED_LANDLOCK = frozenset({"@fs-at"})

# Rights (protocol.Rights bits) a group hands to every fd NOT pinned at entry, so the broker can no longer
# withhold them from a grant made later, and a pinned fd lacking them must not be duplicated (pinned_rule).
GROUPS_WEAKEN: dict[str, int] = {
    "@fs-at": 0,  # but see DIR_LOOKUP_WEAKENS
    "@fd-metadata": int(Rights.FCHMOD | Rights.FCHOWN | Rights.FUTIMES),
    "@splice": 0,  # positional splice/sendfile/copy_file_range on a pinned fd still need SEEK
    "@memlock": 0,
    "@sched": 0,
    "@flock": int(Rights.FLOCK),
}
# A directory grant held with LOOKUP under @fs-at can be reopened as openat(N, "."): the new fd is not
# pinned, so SEEK and FSTAT on that directory are not enforceable (READ still is: Landlock's READ_DIR).
DIR_LOOKUP_WEAKENS = int(Rights.SEEK | Rights.FSTAT)

# Named options that loosen what is otherwise denied. Each maps to the rules it
# replaces or adds.
DANGEROUS: dict[str, dict[str, Rule]] = {
    # JITs (PROT_EXEC mappings). Lets injected machine code persist as code. File mappings still need a
    # pinned fd (with MMAP_X for PROT_EXEC), but mprotect can then add PROT_EXEC to any mapping.
    "allow-exec-mappings": {"mmap": [[_ANON]], "mprotect": None, "pkey_mprotect": None},
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


# --------------------------------------------------------------------------------------------------
# Rights pinned to fd numbers (SandboxSpec.fd_rules). Only compiled in when some fd is pinned.

# syscall -> (argument holding the fd, right a pinned fd needs for it). Without the right the syscall is
# denied on that fd; with it, the fd gets the base rule plus PINNED_EXTRA.
PINNED_NEEDS: dict[str, tuple[int, Rights]] = {
    **dict.fromkeys(["lseek", "pread64", "preadv", "preadv2", "pwrite64", "pwritev", "pwritev2"], (0, Rights.SEEK)),
    **dict.fromkeys(["fstat", "newfstatat", "statx"], (0, Rights.FSTAT)),  # any flags: (N, ".") stats a dir too
    **dict.fromkeys(["ftruncate", "fallocate"], (0, Rights.FTRUNCATE)),
    **dict.fromkeys(["fsync", "fdatasync", "sync_file_range"], (0, Rights.FSYNC)),
    "fstatfs": (0, Rights.FSTATFS),
    "fchmod": (0, Rights.FCHMOD),
    "fchown": (0, Rights.FCHOWN),
    "flock": (0, Rights.FLOCK),
    "utimensat": (0, Rights.FUTIMES),
    # Landlock does not check getdents on a directory fd opened before entry
    "getdents64": (0, Rights.READ),
}
# What a pinned fd holding the right may do beyond the base rule (most of these are denied on unpinned fds).
PINNED_EXTRA: dict[str, Rule] = {
    **dict.fromkeys(["fsync", "fdatasync", "sync_file_range", "fstatfs", "fchmod", "fchown", "flock"]),
    "fallocate": None,  # every mode, KEEP_SIZE (not bounded by RLIMIT_FSIZE) included
    "utimensat": [_NULL_ARG1],  # the fd itself, not a path beneath it
}
# Never free or replace a pinned slot (a weaker fd could then take its number): fd argument per syscall.
# close_range is checked against every pinned number (pinned_range). F_DUPFD cannot land on a used slot.
SLOT_ARGS: dict[str, int] = {"close": 0, "dup2": 1, "dup3": 1}
# Duplicating a pinned fd gives an unpinned fd to the same file, which has every UNPINNED_RIGHTS right:
# allowed only from a pinned fd that already holds them (dup_safe). fcntl F_DUPFD* is in pinned_rule.
DUP_ARGS: dict[str, int] = {"dup": 0, "dup2": 0, "dup3": 0}
# Positional I/O through a pinned fd without SEEK: (fd argument, offset pointer argument) that must be NULL.
OFFSET_ARGS: dict[str, tuple[tuple[int, int], ...]] = {
    "sendfile": ((1, 2),),
    "copy_file_range": ((0, 1), (2, 3)),
    "splice": ((0, 1), (2, 3)),
}
# Rights every unpinned fd has through the base allowlist (the broker withholds them from later grants
# by substitution: pipes, the no-truncate opener). FTRUNCATE only matters on a writable fd, getdents
# (READ) only on a directory, which is never writable.
UNPINNED_RIGHTS = int(Rights.SEEK | Rights.FSTAT | Rights.FTRUNCATE | Rights.READ)
# With any pinned fd that may not be duplicated, the worker must not hold both ends of a socket: it
# could pass the fd to itself with SCM_RIGHTS and receive an unpinned duplicate. (Only socketpair makes
# such a pair: bind/connect/accept are not allowed.)
LOOPBACK_SYSCALLS = ("socketpair",)


_ALL_RIGHTS = int(Rights.all())  # Rights.all() walks every member: ~80 us a call


def _rights(value: int) -> Rights:
    return Rights(value & _ALL_RIGHTS)


def free_rights(groups: Iterable[str]) -> int:
    """The rights an fd not pinned at entry has, given the groups."""
    out = UNPINNED_RIGHTS
    for g in groups:
        out |= GROUPS_WEAKEN.get(g, 0)
    return out


def dup_safe(rights: int, groups: Iterable[str]) -> bool:
    """True if an unpinned duplicate of a pinned fd holding ``rights`` could do no more than the fd."""
    r = _rights(rights)
    need = free_rights(groups)
    if r & (Rights.WRITE | Rights.APPEND):
        need &= ~int(Rights.READ)  # a writable fd is no directory: getdents fails
    else:
        need &= ~int(Rights.FTRUNCATE)  # ftruncate needs a writable fd (access mode fixed at open)
    return not need & ~int(r)


def normalize(rule: Rule) -> Rule:
    """None if some alternative tests nothing; drop repeated alternatives."""
    if rule is None or any(not alt for alt in rule):
        return None
    out: list[list[Cond]] = []
    for alt in rule:
        if alt not in out:
            out.append(alt)
    return out


def _or(a: Rule, b: Rule) -> Rule:
    return None if a is None or b is None else normalize(a + b)


def _without_cmds(rule: Rule, arg: int, cmds: tuple[int, ...]) -> Rule:
    """``rule`` with ``args[arg] in cmds`` removed (fcntl without its dup commands)."""
    nots = [Cond(arg, c, op="ne") for c in cmds]
    if rule is None:
        return [nots]
    out = []
    for alt in rule:
        exact = [c.value for c in alt if c.arg == arg and c.op == "eq" and c.mask == 0xFFFFFFFF and not c.hi]
        if exact and exact[0] in cmds:
            continue  # this alternative is exactly one of the commands
        out.append(alt if exact else [*alt, *nots])  # another exact command cannot match cmds either
    return out


def _mmap_extra(r: Rights, exec_mappings: bool) -> Rule:
    """File mappings of a pinned fd: MMAP_R for any; PROT_EXEC needs MMAP_X and the dangerous option;
    a shared writable mapping needs MMAP_W. An APPEND fd gets private mappings only: a shared one
    could be made writable later with mprotect (the kernel allows it on any writable fd, O_APPEND or not)."""
    if Rights.MMAP_R not in r:
        return []
    base = [] if exec_mappings and Rights.MMAP_X in r else [Cond(2, 0, mask=PROT_EXEC)]
    private = Cond(3, 0, mask=MAP_SHARED)
    if Rights.APPEND in r:
        return [[*base, private]]
    if Rights.MMAP_W in r:
        return [base]
    return [[*base, Cond(2, 0, mask=PROT_WRITE)], [*base, private]]


def pinned_rule(name: str, rights: int, base: Rule, *, groups: Iterable[str] = (), exec_mappings: bool = False) -> Rule:
    """The rule for syscall ``name`` when its fd argument (PIN_ARG) is a pinned fd holding ``rights``.

    ``base`` is the rule every other fd gets (``[]`` if the syscall is not allowed at all). The result
    replaces it for that fd; ``[]`` denies.
    """
    groups = tuple(groups)
    r = _rights(rights)
    if name in SLOT_ARGS and SLOT_ARGS[name] == PIN_ARG.get(name):
        return []  # close(N)
    if name in DUP_ARGS:
        return base if dup_safe(r, groups) else []
    if name in PINNED_NEEDS:
        if PINNED_NEEDS[name][1] not in r:
            return []
        return _or(base, PINNED_EXTRA[name]) if name in PINNED_EXTRA else base
    if name == "fcntl":
        rule = base if dup_safe(r, groups) else _without_cmds(base, 1, (F_DUPFD, F_DUPFD_CLOEXEC))
        extra: list[list[Cond]] = []
        if Rights.FCNTL in r:  # any flags; with APPEND, never clearing O_APPEND
            extra.append(_SETFL_KEEPS_APPEND if Rights.APPEND in r else [Cond(1, F_SETFL)])
        if Rights.FLOCK in r:
            extra += _one_of(1, LOCK_FCNTLS)
        return _or(rule, extra)
    if name == "ioctl":
        return [[Cond(1, TIOCSTI, op="ne"), Cond(1, TIOCLINUX, op="ne")]] if Rights.IOCTL in r else base
    if name == "mmap":
        return _or(base, _mmap_extra(r, exec_mappings))
    return base


def pinned_guards(name: str, rights: int) -> list[tuple[int, Rule]]:
    """Tests on a pinned fd in a secondary argument: (fd argument, rule that must hold; ``[]`` denies)."""
    r = _rights(rights)
    out: list[tuple[int, Rule]] = []
    if name in SLOT_ARGS and SLOT_ARGS[name] != PIN_ARG.get(name):
        out.append((SLOT_ARGS[name], []))  # dup2/dup3 onto N
    if Rights.SEEK not in r:
        for fd_arg, off_arg in OFFSET_ARGS.get(name, ()):
            out.append((fd_arg, [[Cond(off_arg, 0), Cond(off_arg, 0, hi=True)]]))
    return out


# The argument pinned_rule keys on, for every syscall it may change.
PIN_ARG: dict[str, int] = {
    "close": 0,
    **DUP_ARGS,
    **{name: arg for name, (arg, _) in PINNED_NEEDS.items()},
    "fcntl": 0,
    "ioctl": 0,
    "mmap": 4,
}
# Syscalls with a pinned_guards test (on top of PIN_ARG, or alone).
GUARDED = frozenset(SLOT_ARGS) | frozenset(OFFSET_ARGS)


def _check_groups() -> None:
    for group_name, rules in GROUPS.items():
        bad = ALWAYS_DENIED.intersection(rules)
        if bad:
            raise AssertionError(f"group {group_name} would allow always-denied {sorted(bad)}")
    bad = ALWAYS_DENIED.intersection(BASE)
    if bad:
        raise AssertionError(f"base allowlist contains always-denied {sorted(bad)}")


_check_groups()
