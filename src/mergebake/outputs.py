"""Atomic output folders, checksums and provenance records.

Every step writes into a temporary folder beside its output and renames it into place
only when complete, so a killed job never leaves anything that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import threading
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from . import MergebakeError

PACKAGES = (
    "mergebake",
    "torch",
    "transformers",
    "peft",
    "mergekit",
    "lm_eval",
    "safetensors",
    "huggingface_hub",
    "snakemake",
)
_CHUNK = 16 * 1024 * 1024
PROVENANCE = "provenance.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clear_stale(final: Path) -> None:
    """Remove temporary siblings of ``final`` left by killed writers (their pid is gone)."""
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _is_disk_full(e: BaseException) -> bool:
    """ENOSPC, also as wrapped by safetensors' Rust writer (``IoError(... StorageFull``)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    text = str(e)
    return "No space left on device" in text or "StorageFull" in text


def _disk_full(final: Path, e: BaseException) -> MergebakeError:
    return MergebakeError(
        f"{final}: no space left on device while writing it ({type(e).__name__}); free space on "
        f"{final.parent.resolve()} or run in a working directory with more room. Nothing "
        "was left behind"
    )


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes ``final`` when the block succeeds.

    The folder is created beside ``final`` (same file system, so the rename is atomic) and
    named ``.<name>.tmp-<pid>``; leftovers of killed writers are removed first. On any
    exception the folder is removed and the exception re-raised, leaving ``final``
    untouched; a full disk (``ENOSPC``) becomes a :class:`MergebakeError` naming ``final``.
    An existing ``final`` is replaced.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(e):
            raise _disk_full(final, e) from e
        raise
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``final``; rename it into place when the block succeeds.

    Text mode writes UTF-8. Same failure behaviour as :func:`atomic_dir`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(e):
            raise _disk_full(final, e) from e
        raise
    os.replace(tmp, final)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON, atomically."""
    with atomic_file(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# In-process memo of file hashes by identity: (st_dev, st_ino, st_size, st_mtime_ns) ->
# sha256 hex. A hard link made by a step (normalise links unchanged files) has the same
# identity as its source, so a file hashed as an input is not hashed again as an output.
_HASHED: dict[tuple[int, int, int, int], str] = {}


def _sha256_stat(p: Path, st: os.stat_result, memo: bool) -> str:
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    digest = _HASHED.get(ident) if memo else None
    if digest is None:
        digest = _HASHED[ident] = sha256_file(p)
    return digest


def remember_sha256(path: str | os.PathLike, digest: str) -> None:
    """Record ``digest`` (sha256 hex) as the hash of ``path`` as it is now, for this process:
    :func:`output_manifest` and :func:`file_manifest` then take it instead of reading the
    file. Call it only once the file is complete; the record is keyed by the file's device,
    inode, size and mtime, so any later write to the file makes it unused."""
    st = os.stat(path)
    _HASHED[(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)] = digest


class FollowingHash:
    """The sha256 of a file that other threads write out of order, computed by a thread of
    its own while they write, so that hashing the output costs no time after the writing.

    The writers report each byte range they completed (:meth:`written`); the thread hashes
    the file's contiguous written prefix as it grows, reading it back from the page cache
    (``pread``, :data:`_CHUNK` at a time; ``hashlib`` releases the GIL). :meth:`finish`,
    called once every write is done, hashes whatever is left up to the end of the file
    (ranges nobody reported, e.g. holes) and returns the hex digest of the whole file as
    it is on disk, whatever was reported: the reports only decide when bytes are read,
    never what is hashed. :meth:`cancel` stops the thread without a result (on an error).
    Raises ``OSError`` from :meth:`finish` when the file cannot be read.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._hash = hashlib.sha256()
        self._pos = 0  # bytes hashed so far
        self._mark = 0  # end of the contiguous reported prefix
        self._ranges: dict[int, int] = {}  # reported ranges beyond the mark: start -> end
        self._cond = threading.Condition()
        self._state = "run"  # -> "finish" | "cancel"
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._follow, name="hash-follow", daemon=True)
        self._thread.start()

    def written(self, offset: int, nbytes: int) -> None:
        """Bytes ``[offset, offset + nbytes)`` of the file are written (any thread)."""
        with self._cond:
            if offset > self._mark:
                self._ranges[offset] = max(self._ranges.get(offset, 0), offset + nbytes)
                return
            self._mark = max(self._mark, offset + nbytes)
            while self._mark in self._ranges:
                self._mark = max(self._mark, self._ranges.pop(self._mark))
            self._cond.notify()

    def _hash_to(self, end: int, buf: memoryview) -> None:
        while self._pos < end and self._state != "cancel":
            n = os.preadv(self._fd, [buf[: min(len(buf), end - self._pos)]], self._pos)
            if n <= 0:
                return
            self._hash.update(buf[:n])
            self._pos += n

    def _follow(self) -> None:
        buf = memoryview(bytearray(_CHUNK))
        try:
            while True:
                with self._cond:
                    while self._state == "run" and self._mark - self._pos < _CHUNK:
                        self._cond.wait()
                    state, mark = self._state, self._mark
                if state == "cancel":
                    return
                if state == "finish":
                    self._hash_to(os.fstat(self._fd).st_size, buf)
                    return
                self._hash_to(mark, buf)
        except BaseException as e:  # raised by finish()
            self._error = e

    def _stop(self, state: str) -> None:
        with self._cond:
            self._state = state
            self._cond.notify()
        self._thread.join()
        os.close(self._fd)

    def finish(self) -> str:
        """Hex sha256 of the whole file; call after the last write to it."""
        self._stop("finish")
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()

    def cancel(self) -> None:
        """Stop without a result (the writes failed)."""
        self._stop("cancel")


def recorded_outputs(folder: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], int]:
    """The output manifest the step that wrote ``folder`` recorded in its ``provenance.json``,
    and that file's ``st_mtime_ns``.

    ``({relative POSIX path: {"bytes": int, "sha256": hex str}}, mtime_ns)`` as
    :func:`write_provenance` writes it under ``outputs``; ``({}, 0)`` when the folder has
    no ``provenance.json``, it is unreadable or not JSON, or it records no outputs (folders
    written before steps recorded them). Entries lacking a field are left out.
    """
    prov = Path(folder) / PROVENANCE
    try:
        mtime = prov.stat().st_mtime_ns
        record = json.loads(prov.read_text())
    except (OSError, ValueError):
        return {}, 0
    outputs = record.get("outputs") if isinstance(record, dict) else None
    if not isinstance(outputs, dict):
        return {}, 0
    kept = {
        rel: e
        for rel, e in outputs.items()
        if isinstance(e, dict)
        and isinstance(e.get("sha256"), str)
        and isinstance(e.get("bytes"), int)
    }
    return kept, mtime


def _manifest(folder: Path, reuse: bool, memo: bool) -> dict[str, dict[str, Any]]:
    records, recorded_at = recorded_outputs(folder) if reuse else ({}, 0)
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name == PROVENANCE:
            continue
        rel = p.relative_to(folder).as_posix()
        st = p.stat()
        rec = records.get(rel)
        if rec is not None and rec["bytes"] == st.st_size and st.st_mtime_ns <= recorded_at:
            digest = rec["sha256"]  # the writer's own hash; not modified since it was recorded
            _HASHED[(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)] = digest
        else:
            digest = _sha256_stat(p, st, memo)
        out[rel] = {"bytes": st.st_size, "sha256": digest}
    return out


def file_manifest(folder: str | os.PathLike, *, reuse: bool = True) -> dict[str, dict[str, Any]]:
    """Map each regular file under ``folder`` (relative POSIX path) to its size (bytes) and sha256.

    ``provenance.json`` itself is skipped, so a manifest describes the payload only. With
    ``reuse`` (the default) a file's sha256 is taken from the output manifest its writer
    recorded (:func:`recorded_outputs`) when its size is the recorded one and it was last
    modified no later than ``provenance.json`` (which the writer writes after its payload:
    any later change to a file gives it a newer mtime), and read and hashed (16 MiB chunks)
    otherwise, so an input produced by an earlier mergebake step is not hashed twice. Like
    ``make`` and git's index, this trusts mtimes: a file changed while keeping its size and
    an mtime older than the record (``touch -d``, ``cp -p`` of other bytes over it) is
    taken for what was recorded. Without ``reuse`` every file is read and hashed.
    """
    return _manifest(Path(folder), reuse, memo=reuse)


def output_manifest(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """What :func:`write_provenance` records under ``outputs``: each payload file's size
    (bytes) and sha256, hashed afresh (files a step hard-linked from an input it already
    hashed are not read again). No mtimes, so a rebuild that writes the same bytes writes
    the same ``provenance.json``."""
    return _manifest(Path(folder), reuse=False, memo=True)


def recorded_sha256(folder: str | os.PathLike, files: Mapping[str, Path]) -> dict[str, str]:
    """sha256 (hex) of each of ``files`` (relative POSIX path under ``folder`` -> path),
    taken from ``folder``'s own output record where it still holds (size recorded, not
    modified after ``provenance.json``; the rule of :func:`file_manifest`) and read and
    hashed otherwise (``provenance.json`` itself always). For steps such as an upload
    that send a step's folder and must not hash its gigabytes again."""
    records, recorded_at = recorded_outputs(folder)
    out: dict[str, str] = {}
    for rel, p in files.items():
        st = p.stat()
        rec = records.get(rel)
        if rec is not None and rec["bytes"] == st.st_size and st.st_mtime_ns <= recorded_at:
            out[rel] = rec["sha256"]
        else:
            out[rel] = _sha256_stat(p, st, memo=True)
    return out


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages whose behaviour decides the output bytes."""
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = None
    return versions


def describe_input(path: str | os.PathLike) -> dict[str, Any]:
    """Provenance entry for one input: its absolute path, and sha256 of its files.

    Where the input folder carries its own ``provenance.json`` (an upstream mergebake
    step, or a fetch that recorded the resolved Hub commit), its ``source`` is kept too,
    and the sha256s it recorded for its outputs are reused where size and mtime still
    match (:func:`file_manifest`).
    """
    path = Path(path)
    entry: dict[str, Any] = {"path": str(path.resolve())}
    if path.is_dir():
        entry["files"] = {k: v["sha256"] for k, v in file_manifest(path).items()}
        prov = path / PROVENANCE
        if prov.is_file():
            upstream = json.loads(prov.read_text())
            if "source" in upstream:
                entry["source"] = upstream["source"]
    elif path.is_file():
        entry["sha256"] = sha256_file(path)
    return entry


def write_provenance(
    out_dir: str | os.PathLike,
    *,
    step: str,
    inputs: Mapping[str, str | os.PathLike],
    params: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    seed: int | None = None,
    described: Mapping[str, Mapping[str, Any]] | None = None,
    record_outputs: bool = True,
) -> dict[str, Any]:
    """Write ``provenance.json`` into ``out_dir`` and return what was written.

    Records the step, each named input (path + sha256s), the parameters, the command
    line, the package versions and the seed. ``described`` adds inputs already described
    with :func:`describe_input` (e.g. hashed in a background thread while the step ran).
    With ``record_outputs`` (call it last, once every payload file is written) it also
    records ``outputs``, the :func:`output_manifest` of ``out_dir``, which later steps
    reading the folder reuse instead of hashing it again.
    No environment variable is recorded, so a token can never leak into it.
    """
    record: dict[str, Any] = {
        "step": step,
        "inputs": {
            **{name: describe_input(p) for name, p in inputs.items()},
            **{name: dict(d) for name, d in (described or {}).items()},
        },
        "params": dict(params or {}),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "packages": package_versions(),
        "seed": seed,
    }
    if source is not None:
        record["source"] = dict(source)
    if record_outputs:
        record["outputs"] = output_manifest(out_dir)
    write_json(Path(out_dir) / PROVENANCE, record)
    return record


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link ``src`` to ``dst``, or copy it where a link cannot be made."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
