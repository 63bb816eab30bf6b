"""Every write of the package and its libraries, counted, and the k-th one failed as a full disk or
a read-only folder fails it (test_writes.py).

The lowest-level ways a file or folder is written here: Python's ``open`` (json, transformers'
config and tokenizer files, TensorBoard), ``os.open``/``os.write`` (``atomic_write``'s temporaries,
``append_whole``), ``os.mkdir``, ``os.rename``/``os.replace``, ``torch.save`` (C++: optimizer,
scheduler, RNG states) and safetensors' ``save_file`` (Rust: weights). Not covered: tokenizers'
``tokenizer.json``, written by Rust code that cannot be replaced from Python (its error quotes
``(os error 28)`` as safetensors' does, see test_writes.py).

With ``fault="kill"`` the process ends there instead (``os._exit``, as ``kill -9`` or an
out-of-memory kill ends it: no ``except``, ``finally`` or buffer flush runs), leaving what that write
had done by then: nothing for a call that writes a whole buffer or renames, the start of the file for
torch's and safetensors' saves (``killed_command``, run in a child process by test_kills.py).

A failed write raises what the real one raises: ``OSError`` ENOSPC naming no file at a Python
write (after half the bytes, for ``os.write``), ``OSError`` EROFS naming the file where a file is
created in a read-only folder, torch's ``RuntimeError`` without an errno (``unexpected pos``) and
safetensors' ``SafetensorError`` quoting the errno. From the failure on, ``os.statvfs`` shows the
disk full (or read-only), as the real disk would be.
"""
from __future__ import annotations

import builtins
import errno
import importlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
SAFETENSORS_SAVERS = [("safetensors.torch", "save_file"), ("transformers.modeling_utils", "safe_save_file"),
                      ("accelerate.utils.other", "safe_save_file")]


class WriteFaults:
    """Counts writes (``self.writes``: ``"<kind of write> <path>"`` in order) and fails one as
    ``fault`` (``full`` or ``read-only``) does: the write number ``fail_at`` (1-based), or the
    ``nth`` whose description ``fail_at`` (a compiled regex, or any object with ``search``) matches;
    None: none. ``self.failed`` is
    the failed write's description."""

    def __init__(self, monkeypatch, fail_at=None, fault: str = "full", nth: int = 1, report: str | None = None):
        self.fail_at, self.fault, self.writes, self.failed = fail_at, fault, [], None
        self.matches_left, self.report = nth, report       # report: where a kill writes which write it was
        self.fds = {}                                  # fd → path, of files opened for writing
        real = {name: getattr(os, name) for name in ("open", "write", "close", "mkdir", "rename", "replace", "statvfs")}
        real_open, real_save = io.open, torch.save
        self.real_open = real_open

        def open_(file, mode="r", *args, **kwargs):
            if not (file in self.fds if isinstance(file, int) else set(mode) & set("wax+")):
                return real_open(file, mode, *args, **kwargs)
            if not self.hit("open", self.fds.get(file, file)):
                return real_open(file, mode, *args, **kwargs)
            if fault == "read-only" and not isinstance(file, int):
                raise self.error(file)
            f = real_open(file, mode, *args, **kwargs)

            def write(data):
                raise self.error()
            f.write = write
            return f

        def os_open(path, flags, *args, **kwargs):
            if not flags & WRITE_FLAGS or str(path).startswith("/dev/"):
                return real["open"](path, flags, *args, **kwargs)
            if self.hit("os.open", path):
                raise self.error(path)
            fd = real["open"](path, flags, *args, **kwargs)
            self.fds[fd] = str(path)
            return fd

        def os_write(fd, data):
            if fd in self.fds and self.hit("os.write", self.fds[fd]):
                if fault == "kill":                   # a kill lands between write calls, not inside one
                    self.die()
                real["write"](fd, bytes(data)[:len(data) // 2])     # the disk filled half way
                raise self.error()
            return real["write"](fd, data)

        def os_close(fd):
            self.fds.pop(fd, None)
            return real["close"](fd)

        def one_path(name):
            def call(path, *args, **kwargs):
                if name == "mkdir" and os.path.isdir(path):     # the system says EEXIST before anything else
                    return real[name](path, *args, **kwargs)
                if self.hit(name, path):
                    raise self.error(path, *args[:1] if name != "mkdir" else ())
                return real[name](path, *args, **kwargs)
            return call

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, Path)) and self.hit("torch.save", f):
                self.leave(f, b"PK\x03\x04 cut short")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
                                   if fault == "full" else
                                   f"[enforce fail at inline_container.cc:747] . open file failed with strerror: "
                                   f"{os.strerror(errno.EROFS)}")
            return real_save(obj, f, *args, **kwargs)

        def statvfs(path):
            disk = real["statvfs"](path)
            if self.failed is None:
                return disk
            values = list(disk)
            if fault == "full":
                values[3] = values[4] = 0                          # f_bfree, f_bavail
            else:
                values[8] |= os.ST_RDONLY                           # f_flag
            return os.statvfs_result(values)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "write", os_write)
        monkeypatch.setattr(os, "close", os_close)
        for name in ("mkdir", "rename", "replace"):
            monkeypatch.setattr(os, name, one_path(name))
        monkeypatch.setattr(os, "statvfs", statvfs)
        monkeypatch.setattr(torch, "save", save)
        savers = [(module, name, getattr(importlib.import_module(module), name)) for module, name in SAFETENSORS_SAVERS]
        for module, name, real_safe in savers:          # all imported before any is replaced
            monkeypatch.setattr(importlib.import_module(module), name, self.safetensors_save(real_safe))

    def safetensors_save(self, real):
        def save_file(tensors, filename, *args, **kwargs):
            if self.hit("safetensors", filename):
                from safetensors import SafetensorError
                self.leave(filename, b"\x08\x00 cut short")
                raise SafetensorError(f"Error while serializing: I/O error: {self.error().strerror} "
                                      f"(os error {self.error().errno})")
            return real(tensors, filename, *args, **kwargs)
        return save_file

    def hit(self, what: str, path) -> bool:
        """Count one write; whether it is the one to fail."""
        self.writes.append(f"{what} {os.fsdecode(path) if isinstance(path, bytes) else path}")
        if self.failed is not None or self.fail_at is None:
            return False
        if isinstance(self.fail_at, int):
            fails = len(self.writes) == self.fail_at
        else:
            self.matches_left -= bool(self.fail_at.search(self.writes[-1]))
            fails = self.matches_left == 0
        if fails:
            self.failed = self.writes[-1]
        return fails

    def error(self, path=None, other=None) -> OSError:
        """What the system raises: a call that takes paths names them; a write to an open file names none."""
        if self.fault == "kill":
            self.die()
        number = errno.ENOSPC if self.fault == "full" else errno.EROFS
        if path is None:
            return OSError(number, os.strerror(number))
        return OSError(number, os.strerror(number), str(path), None, None if other is None else str(other))

    def leave(self, path, data: bytes) -> None:
        """The start of a file a library's failed (or killed) write leaves behind."""
        if self.fault in ("full", "kill"):
            with self.real_open(path, "wb") as f:
                f.write(data)
        if self.fault == "kill":
            self.die()

    def die(self) -> None:
        if self.report:                                # which write it was, for the parent to check
            with self.real_open(self.report, "w", encoding="utf-8") as f:
                f.write(self.failed)
        os._exit(KILLED)


KILLED = 137        # the exit status a shell shows for a process ended by SIGKILL


def kind_of(write: str, run) -> str:
    """A write's description with its run folder as RUN, a tiny tokenizer's temporary folder as TMP/X,
    a logits file's key as KEY, step numbers as N and the random part of a temporary's name as .TMP
    (``.result.csv.TMP``): what kind of write it is, the same in every run.
    (Not ``tempfile.gettempdir()``: a process's first call writes a file to probe the folder, and
    from within a write that ``Kind`` counts it would wait forever for its own lock.)"""
    text = re.sub(r"\S*/hw7qa-tiny-tokenizer-\w+", "TMP/X", write.replace(str(run), "RUN"))
    text = re.sub(r"/logits/\.?\w+\.npz", "/logits/KEY.npz", text)      # the key names the model file's mtime
    return re.sub(r"(?<=step-)\d+|(?<=random_states_)\d+", "N", re.sub(r"\.\w+\.tmp$", ".TMP", text))


@dataclass(frozen=True)
class Kind:
    """Matches the writes of one kind (``kind_of``) in the run folder ``run``: a ``fail_at`` for WriteFaults."""
    kind: str
    run: str

    def search(self, write: str) -> bool:
        return kind_of(write, self.run) == self.kind


def killed_command(command: list[str], fail_at, nth: int, report: str) -> None:
    """``python -m hw7qa *command`` killed at the ``nth`` write that ``fail_at`` matches (an object
    with ``search(description)``), after writing that write's description to ``report``; exits with
    the command's code if it never gets there. The target of a forked child (test_kills.py)."""
    import pytest
    from hw7qa.__main__ import main
    WriteFaults(pytest.MonkeyPatch(), fail_at, "kill", nth, report)
    raise SystemExit(main(command))
