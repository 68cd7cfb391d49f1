"""Subject manifests: one subject per line, ``#`` comments, an optional sequence filter per line.

    # comment
    017                      all performance sequences of subject 017
    043  EXP-4-lips SEN-01-cramp_small_danger     only these sequences
    043  timestamps=first:40  EXP-4-lips           the first 40 frames of it, no selection (test subjects)

An option ``timestamps=MODE`` (``select`` or ``first:N``) overrides the pipeline's ``select.timestamps``
for that subject.

Ids are NeRSemble's 3-digit participant numbers; anything else (``../x``, ``17``, ``abc``) is refused
before any work starts, with the file and line number.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from .errors import InputError

_ID = re.compile(r"^[0-9]{3}$")  # ASCII digits only: \d also matches the digits of other scripts
_SEQUENCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+\-]{0,127}$")  # NeRSemble's longest name is ~35 characters
MAX_LINE = 4096  # characters; a manifest line is an id and a few sequence names
MAX_BYTES = 16 << 20  # a manifest of every NeRSemble subject is a few kilobytes
# The Face Anything test split (never used for training).
TEST_SUBJECTS = ("043", "128", "236", "306", "474")


class ManifestError(InputError, ValueError):
    """A manifest line is not ``ID [SEQUENCE ...]`` with a 3-digit id; names the file and line."""


@dataclass
class ManifestEntry:
    subject: str
    sequences: list[str] = field(default_factory=list)  # empty = all
    timestamps: str = ""  # select.timestamps for this subject; empty = the pipeline's


def _short(text: str, limit: int = 60) -> str:
    """``text`` for an error message: at most ``limit`` characters, the rest counted."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    if path.stat().st_size > MAX_BYTES:
        raise ManifestError(f"{path}: {path.stat().st_size} bytes; a manifest is at most {MAX_BYTES} bytes")
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    entries, seen = [], set()
    for n, line in enumerate(lines, 1):
        if len(line) > MAX_LINE:
            raise ManifestError(f"{path}:{n}: line of {len(line)} characters (at most {MAX_LINE})")
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        sid, *seqs = text.split()
        if not _ID.match(sid):
            raise ManifestError(f"{path}:{n}: subject id {_short(sid)} is not a 3-digit NeRSemble id")
        options = dict(s.split("=", 1) for s in seqs if "=" in s)
        seqs = [s for s in seqs if "=" not in s]
        unknown = sorted(set(options) - {"timestamps"})
        if unknown:
            raise ManifestError(f"{path}:{n}: unknown option(s) {', '.join(map(_short, unknown))} (known: timestamps=)")
        timestamps = options.get("timestamps", "")
        if timestamps:
            from .config import first_frames

            try:
                first_frames(timestamps)
            except ValueError as exc:
                raise ManifestError(f"{path}:{n}: timestamps={_short(timestamps)}: {exc}") from None
        bad = [_short(s) for s in seqs if not _SEQUENCE.match(s)]
        if bad:
            raise ManifestError(f"{path}:{n}: invalid sequence name(s) {', '.join(bad)}")
        if sid in seen:
            raise ManifestError(f"{path}:{n}: subject {sid} listed twice")
        seen.add(sid)
        entries.append(ManifestEntry(sid, seqs, timestamps))
    if not entries:
        raise ManifestError(f"{path}: no subjects")
    return entries


def subjects_from_metadata(csv_path: str | Path) -> list[str]:
    """Participant ids of NeRSemble's ``metadata_sequences.csv`` (its ``ID`` column), as 3-digit ids."""
    import csv

    path = Path(csv_path)
    if not path.is_file():
        raise ManifestError(f"{path}: metadata file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "ID" not in reader.fieldnames:
            raise ManifestError(f"{path}: no 'ID' column (expected NeRSemble's metadata_sequences.csv)")
        ids = []
        for n, row in enumerate(reader, 2):
            value = (row["ID"] or "").strip()
            if not (value.isascii() and value.isdigit()) or int(value) > 999:
                raise ManifestError(f"{path}:{n}: participant id {value!r} is not a number below 1000")
            ids.append(f"{int(value):03d}")
    return sorted(set(ids))


def write_training_manifest(root: str | Path | None, out: str | Path, metadata: str | Path | None = None) -> list[str]:
    """List the subjects of a NeRSemble download (or of its ``metadata_sequences.csv``) into ``out``,
    leaving out the paper's test subjects; the file is replaced atomically."""
    if metadata is not None:
        found, origin = subjects_from_metadata(metadata), f"--metadata {Path(metadata).name}"
    else:
        from .sources import NeRSembleSource

        found, origin = NeRSembleSource(root).subjects(), "--root DIR"
    subjects = [s for s in found if s not in TEST_SUBJECTS]
    if not subjects:
        raise ManifestError(f"{metadata or root}: no training subjects found")
    lines = [f"# NeRSemble training subjects, generated by `facecanon-data manifest {origin}`.",
             f"# The Face Anything test subjects ({' '.join(TEST_SUBJECTS)}) are left out."] + subjects
    from .artifacts import atomic_write

    text = "\n".join(lines) + "\n"
    atomic_write(Path(out), lambda tmp: tmp.write_text(text))
    return subjects
