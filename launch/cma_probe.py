#!/usr/bin/env python3
"""Exit 0 when one process may read another's memory with process_vm_readv
(cross-memory attach, what Open MPI's shared-memory transport uses to copy a
large message once), 1 when the kernel, a seccomp filter or Yama forbids it.

Like two MPI ranks, the reader is not the target's parent: the parent lets
any process of its user trace it (PR_SET_PTRACER, as Open MPI does), and a
child reads a marker from the parent's memory. launch/mpirun.sh runs this.
"""
import ctypes
import os
import sys

MARKER = b"dtrain cross-memory attach probe"
PR_SET_PTRACER = 0x59616D61
PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def main() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "process_vm_readv"):
        return 1
    libc.prctl(PR_SET_PTRACER, ctypes.c_ulong(PR_SET_PTRACER_ANY), 0, 0, 0)  # fails harmlessly without Yama
    source = ctypes.create_string_buffer(MARKER)
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        target = ctypes.create_string_buffer(len(MARKER))
        local = IoVec(ctypes.cast(target, ctypes.c_void_p), len(MARKER))
        remote = IoVec(ctypes.cast(source, ctypes.c_void_p), len(MARKER))
        n = libc.process_vm_readv(parent, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        os._exit(0 if n == len(MARKER) and target.raw == MARKER else 1)
    _, status = os.waitpid(child, 0)
    return 0 if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
