"""NeRSemble v2 on disk, in the layout its official data kit reads.

``{root}/{pid}/calibration/camera_params.json``  ``{"world_2_cam": {serial: 4x4}, "intrinsics": 3x3}``
``{root}/{pid}/calibration/color_calibration.json``  ``{serial: (3, terms) CCM}`` (optional)
``{root}/{pid}/sequences/{SEQ}/images/cam_{serial}.mp4``
``{root}/{pid}/sequences/{SEQ}/alpha_maps/cam_{serial}.mp4`` (optional foreground mattes)
``{root}/{pid}/sequences/BACKGROUND/image_{serial}.jpg`` (stills of the empty rig, optional)
"""
from __future__ import annotations

import json
import re
from collections import deque
from contextlib import ExitStack
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..cameras import NERSEMBLE_SERIALS, Camera
from ..threads import pool_size
from .base import CaptureSource, GroundTruthAccess
from .video import CaptureFileError, VideoReader
from ..errors import InputValueError

NON_PERFORMANCE_SEQUENCES = ("BACKGROUND",)
FRAMES_IN_FLIGHT = 3  # frames of one video post-processed while the next decodes
PRINCIPAL_POINT_TOLERANCE = 0.2  # fraction of the frame size the principal point may lie off its centre
_SUBJECT_RE = re.compile(r"^[0-9]{3}$")


def _resize(image: np.ndarray, downscale: float) -> np.ndarray:
    if downscale == 1:
        return image
    import cv2

    h, w = image.shape[:2]
    size = (int(round(w / downscale)), int(round(h / downscale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _decode_pool():
    """Threads that decode the cameras of one timestamp in parallel (OpenCV releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=pool_size(16), thread_name_prefix="decode")


MAX_CALIBRATION_BYTES = 16 * 2**20  # a real calibration is a few kB; the manifests' cap too


def _read_json(path: Path) -> dict:
    """A calibration JSON object; a missing, oversized, malformed, too deeply nested or non-object file
    is a :class:`CaptureFileError` naming it."""
    if not path.is_file():
        raise CaptureFileError(f"{path}: file not found")
    size = path.stat().st_size
    if size > MAX_CALIBRATION_BYTES:
        raise CaptureFileError(f"{path}: {size} bytes, larger than any calibration ({MAX_CALIBRATION_BYTES} bytes at most)")
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CaptureFileError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise CaptureFileError(f"{path}: not a calibration (JSON nested too deeply to read)") from None
    if not isinstance(table, dict):
        raise CaptureFileError(f"{path}: expected a JSON object at the top level, got a {type(table).__name__}")
    return table


class NeRSembleSource(CaptureSource):
    """Reads NeRSemble v2 captures (and the synthetic captures written in the same layout).

    Args:
        root: folder holding ``{pid:03d}/`` subject folders.
        ground_truth_root: folder of synthetic ground truth (``{pid}/...``); None for real data.
        color_correction: apply ``color_calibration.json`` when the subject has one.
    """

    def __init__(self, root: str | Path, ground_truth_root: str | Path | None = None,
                 color_correction: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CaptureFileError(f"{self.root}: capture root not found")
        self.ground_truth_root = Path(ground_truth_root) if ground_truth_root else None
        self.color_correction = color_correction
        self._calibration = lru_cache(maxsize=None)(self._load_calibration)
        self._ccm = lru_cache(maxsize=None)(self._load_ccm)
        self._videos = lru_cache(maxsize=None)(self._sequence_videos)
        self._present = lru_cache(maxsize=None)(self._list_present)
        # 64 MiB each: the camera read last (select reads the frontal one over every sequence) and one more.
        self._color_table = lru_cache(maxsize=2)(self._build_color_table)

    # -- layout --------------------------------------------------------------------------------
    def subject_dir(self, subject: str) -> Path:
        if not _SUBJECT_RE.match(subject):
            raise InputValueError(f"subject id {subject!r} is not a 3-digit NeRSemble id")
        path = self.root / subject
        if not path.is_dir():
            raise CaptureFileError(f"{path}: subject folder not found")
        return path

    def video_path(self, subject: str, sequence: str, serial: str, kind: str = "images") -> Path:
        return self.subject_dir(subject) / "sequences" / sequence / kind / f"cam_{serial}.mp4"

    def subjects(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and _SUBJECT_RE.match(p.name)
                      and (p / "calibration" / "camera_params.json").is_file())

    def sequences(self, subject: str) -> list[str]:
        seq_dir = self.subject_dir(subject) / "sequences"
        if not seq_dir.is_dir():
            raise CaptureFileError(f"{seq_dir}: no sequences folder")
        return sorted(p.name for p in seq_dir.iterdir()
                      if p.is_dir() and p.name not in NON_PERFORMANCE_SEQUENCES and (p / "images").is_dir())

    # -- calibration ---------------------------------------------------------------------------
    def _load_calibration(self, subject: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        path = self.subject_dir(subject) / "calibration" / "camera_params.json"
        raw = _read_json(path)
        try:
            w2c = {str(s): np.asarray(m, dtype=np.float64) for s, m in raw["world_2_cam"].items()}
            k = np.asarray(raw["intrinsics"], dtype=np.float64)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CaptureFileError(f"{path}: expected 'world_2_cam' as an object {{serial: 4x4 matrix}} and "
                                   f"'intrinsics' as a 3x3 matrix ({type(exc).__name__}: {exc})") from None
        if k.shape != (3, 3) or any(m.shape != (4, 4) for m in w2c.values()) or not w2c:
            raise CaptureFileError(f"{path}: intrinsics must be 3x3 and every world_2_cam 4x4")
        if not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0 or not np.allclose(k[2], [0, 0, 1]):
            raise CaptureFileError(f"{path}: intrinsics must be finite with positive focal lengths and a last "
                                   f"row (0, 0, 1), got {k.tolist()}")
        for serial, m in w2c.items():
            r = m[:3, :3]
            if not np.isfinite(m).all():
                raise CaptureFileError(f"{path}: world_2_cam of camera {serial} is not finite")
            if not np.allclose(r @ r.T, np.eye(3), atol=1e-4) or not np.allclose(m[3], [0, 0, 0, 1]):
                raise CaptureFileError(f"{path}: world_2_cam of camera {serial} is not a rigid transform")
            if np.linalg.det(r) < 0:
                raise CaptureFileError(f"{path}: world_2_cam of camera {serial} is a reflection (det R = -1)")
        return w2c, k

    def _load_ccm(self, subject: str) -> dict[str, np.ndarray] | None:
        path = self.subject_dir(subject) / "calibration" / "color_calibration.json"
        if not (self.color_correction and path.is_file()):
            return None
        raw = _read_json(path)
        out = {}
        for serial, m in raw.items():
            try:
                m = np.asarray(m, dtype=np.float64)
            except (TypeError, ValueError):
                raise CaptureFileError(f"{path}: CCM of camera {serial} is not a matrix of numbers") from None
            if m.ndim != 2 or m.shape[0] != 3 or not 1 <= m.shape[1] <= 64:
                raise CaptureFileError(f"{path}: CCM of camera {serial} has shape {m.shape}, expected (3, terms)")
            if not np.isfinite(m).all():
                raise CaptureFileError(f"{path}: CCM of camera {serial} holds NaN or inf")
            out[str(serial)] = m
        return out

    def color_correction_applied(self, subject: str) -> bool:
        return self._ccm(subject) is not None

    def serials(self, subject: str) -> list[str]:
        w2c, _ = self._calibration(subject)
        order = {s: i for i, s in enumerate(NERSEMBLE_SERIALS)}
        return sorted(w2c, key=lambda s: (order.get(s, len(order)), s))

    def _list_present(self, subject: str, sequence: str) -> list[str]:
        """Serials with a video in ``sequence`` (like the official kit, cameras are listed from the files),
        in calibration order; a video of an uncalibrated camera is an error naming the calibration."""
        serials = self.serials(subject)
        folder = self.subject_dir(subject) / "sequences" / sequence / "images"
        present = {p.name[4:-4] for p in folder.glob("cam_*.mp4")}
        uncalibrated = sorted(present - set(serials))
        if uncalibrated:
            raise CaptureFileError(f"{self.subject_dir(subject) / 'calibration' / 'camera_params.json'}: no "
                                   f"calibration for camera(s) {', '.join(uncalibrated)} whose videos are in {folder}")
        if not present:
            raise CaptureFileError(f"{folder}: no camera videos (cam_{{serial}}.mp4)")
        return [s for s in serials if s in present]

    def missing_cameras(self, subject: str, sequence: str) -> list[str]:
        present = set(self._present(subject, sequence))
        return [s for s in self.serials(subject) if s not in present]

    def _sequence_videos(self, subject: str, sequence: str) -> tuple[int, int, int]:
        """(width, height, frames) shared by every camera of a sequence, after checking that the videos
        present belong to calibrated cameras and that all agree in size and frame count (a calibrated
        camera without a video is allowed here: :meth:`missing_cameras` names it, readers of that camera
        fail naming its file, and ``select`` skips the sequence)."""
        headers = {}
        for serial in self._present(subject, sequence):
            path = self.video_path(subject, sequence, serial)
            with VideoReader(path) as r:  # a missing video: "video file not found" naming it
                headers[path] = (r.width, r.height, r.num_frames)
            if headers[path][2] <= 0:
                raise CaptureFileError(f"{path}: the video header gives no frame count")
        # the size and frame count most cameras share is the sequence's: the odd camera out is named,
        # whichever camera comes first
        for field, what in ((lambda h: h[:2], "{0}x{1} frames"), (lambda h: h[2], "{2} frames")):
            values = [field(h) for h in headers.values()]
            common = max(set(values), key=values.count)
            for path, header in headers.items():
                if field(header) != common:
                    other = next(p for p, h in headers.items() if field(h) == common)
                    raise CaptureFileError(f"{path}: {what.format(*header)}, but {other.name} and "
                                           f"{values.count(common) - 1} other camera(s) have "
                                           f"{what.format(*headers[other])} (every camera of a sequence must "
                                           f"agree in size and frame count)")
        ref = next(iter(headers.values()))
        _, k = self._calibration(subject)
        w, h = ref[:2]
        # K belongs to the full-size frames: a principal point far from their centre means the videos
        # were resized (a downscaled release) and K would be scaled wrong.
        if abs(k[0, 2] - w / 2) > PRINCIPAL_POINT_TOLERANCE * w or abs(k[1, 2] - h / 2) > PRINCIPAL_POINT_TOLERANCE * h:
            raise CaptureFileError(f"{self.subject_dir(subject) / 'calibration' / 'camera_params.json'}: "
                                   f"principal point ({k[0, 2]:.0f}, {k[1, 2]:.0f}) is far from the centre of the "
                                   f"{w}x{h} frames of {sequence} (more than {PRINCIPAL_POINT_TOLERANCE:.0%} of the "
                                   "size): were the videos resized?")
        return ref

    def check_subject(self, subject: str) -> None:
        """Parse the calibration and every performance sequence's video headers: a malformed calibration,
        a truncated or disagreeing video is a :class:`CaptureFileError` naming the file. A camera missing
        from some sequences is allowed (``select`` skips those); missing from every sequence, it is an
        error naming its file, since no timestamp of the subject has all views."""
        self._calibration(subject)
        self._ccm(subject)  # a malformed colour calibration is named before any frame is read
        self._check_plates(subject)
        sequences = self.sequences(subject)
        if not sequences:
            raise CaptureFileError(f"{self.subject_dir(subject) / 'sequences'}: no performance sequences")
        incomplete = {}
        for sequence in sequences:
            self._videos(subject, sequence)
            missing = self.missing_cameras(subject, sequence)
            if missing:
                incomplete[sequence] = missing
        if len(incomplete) == len(sequences):
            first = next(iter(incomplete))
            lacking = "; ".join(f"{q}: {' '.join(m)}" for q, m in incomplete.items())
            raise CaptureFileError(f"{self.video_path(subject, first, incomplete[first][0])}: video file not found, "
                                   f"and every sequence of subject {subject} lacks a camera ({lacking})")

    def image_size(self, subject: str, sequence: str | None = None) -> tuple[int, int]:
        """(width, height) at full resolution, from the video headers (calibration has no size)."""
        width, height, _ = self._videos(subject, sequence or self.sequences(subject)[0])
        return width, height

    def cameras(self, subject: str, sequence: str | None = None, downscale: float = 1) -> dict[str, Camera]:
        w2c, k = self._calibration(subject)
        width, height = self.image_size(subject, sequence)
        return {s: Camera(s, k.copy(), w2c[s], width, height).scaled(downscale) for s in self.serials(subject)}

    # -- frames --------------------------------------------------------------------------------
    def num_frames(self, subject: str, sequence: str) -> int:
        return self._videos(subject, sequence)[2]

    def _corrector(self, subject: str, serial: str, frames: int) -> Callable[[np.ndarray], np.ndarray] | None:
        """The colour correction of one camera (None without a calibration): an exact lookup table when
        ``frames`` frames of it will be read and that outweighs building the table, else arithmetic."""
        ccm = self._ccm(subject)
        if ccm is None:
            return None
        from .color import ColorTable, apply_color_correction

        if serial not in ccm:
            raise CaptureFileError(f"{self.subject_dir(subject)}/calibration/color_calibration.json: "
                                   f"no CCM for camera {serial}")
        if frames >= 2 * ColorTable.BUILD_EQUIVALENT_FRAMES:
            return self._color_table(subject, serial)
        return partial(apply_color_correction, ccm=ccm[serial])

    def _build_color_table(self, subject: str, serial: str):
        from .color import ColorTable

        return ColorTable(self._ccm(subject)[serial])

    @staticmethod
    def _postprocess(image: np.ndarray, downscale: float, correct) -> np.ndarray:
        """Resize, then colour-correct: the correction runs on the pixels kept (16x fewer at quarter size;
        the official kit also corrects after downscaling). At ``downscale`` 1 it runs at full size."""
        image = _resize(image, downscale)
        return correct(image) if correct is not None else image

    def frames(self, subject: str, sequence: str, serial: str, indices: Iterable[int] | None = None,
               downscale: float = 1) -> Iterator[tuple[int, np.ndarray]]:
        # Opened first: a missing video is named as such before the sequence-wide checks run.
        with VideoReader(self.video_path(subject, sequence, serial)) as reader, _decode_pool() as pool:
            frames = self._videos(subject, sequence)[2]  # the sequence's cameras agree in size and frame count
            if indices is not None:
                indices = sorted(set(int(i) for i in indices))
            correct = self._corrector(subject, serial, frames if indices is None else len(indices))
            # Frame i is resized and colour-corrected by the pool while frame i + 1 decodes here (decoding
            # is sequential per video, the rest is per frame): a few frames in flight, yielded in order.
            in_flight: deque = deque()
            for i, img in reader.frames(indices):
                in_flight.append((i, pool.submit(self._postprocess, img, downscale, correct)))
                if len(in_flight) > FRAMES_IN_FLIGHT:
                    j, done = in_flight.popleft()
                    yield j, done.result()
            while in_flight:
                j, done = in_flight.popleft()
                yield j, done.result()

    def timestamps(self, subject: str, sequence: str, indices: Iterable[int],
                   downscale: float = 1) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        serials = self.serials(subject)
        with ExitStack() as stack:  # a timestamp needs every calibrated view: a missing video is named here
            readers = {s: stack.enter_context(VideoReader(self.video_path(subject, sequence, s))) for s in serials}
            self._videos(subject, sequence)
            correct = {s: self._corrector(subject, s, 1) for s in serials}  # few timestamps: arithmetic
            pool = stack.enter_context(_decode_pool())
            for i in sorted(set(int(i) for i in indices)):
                futures = {s: pool.submit(lambda s=s, r=r: self._postprocess(r.read(i), downscale, correct[s]))
                           for s, r in readers.items()}
                yield i, {s: f.result() for s, f in futures.items()}

    def timestamp_masks(self, subject: str, sequence: str, indices: Iterable[int],
                        downscale: float = 1) -> Iterator[tuple[int, dict[str, np.ndarray]]] | None:
        serials = self.serials(subject)
        paths = {s: self.video_path(subject, sequence, s, kind="alpha_maps") for s in serials}
        if not all(p.is_file() for p in paths.values()):
            return None

        def gen():
            with ExitStack() as stack:
                readers = {s: stack.enter_context(VideoReader(p)) for s, p in paths.items()}
                pool = stack.enter_context(_decode_pool())
                for i in sorted(set(int(i) for i in indices)):
                    futures = {s: pool.submit(lambda r=r: _resize(r.read(i)[..., 0], downscale).astype(np.float32) / 255.0)
                               for s, r in readers.items()}
                    yield i, {s: f.result() for s, f in futures.items()}

        return gen()

    def masks(self, subject: str, sequence: str, serial: str, indices: Iterable[int],
              downscale: float = 1) -> Iterator[tuple[int, np.ndarray]] | None:
        path = self.video_path(subject, sequence, serial, kind="alpha_maps")
        if not path.is_file():
            return None

        def gen():
            with VideoReader(path) as reader:
                for i, img in reader.frames(indices):
                    yield i, _resize(img[..., 0], downscale).astype(np.float32) / 255.0

        return gen()

    def plate_path(self, subject: str, serial: str) -> Path:
        return self.subject_dir(subject) / "sequences" / "BACKGROUND" / f"image_{serial}.jpg"

    def _check_plates(self, subject: str) -> dict[str, Path] | None:
        """The BACKGROUND stills by serial; None when the capture has none. Some but not all is an error
        naming the missing files: segmenting only some views would silently change every label."""
        paths = {s: self.plate_path(subject, s) for s in self.serials(subject)}
        missing = [p for p in paths.values() if not p.is_file()]
        if not missing:
            return paths
        if len(missing) == len(paths):
            return None
        raise CaptureFileError(f"{missing[0]}: background plate missing ({len(missing)} of {len(paths)} cameras lack "
                               f"one: {', '.join(p.name for p in missing)}); foreground comes from the plates of "
                               "every camera or of none: add the missing stills, remove them all, or set "
                               "reconstruct.use_masks = false")

    def background_plates(self, subject: str, downscale: float = 1) -> dict[str, np.ndarray] | None:
        """The BACKGROUND stills, colour-corrected and resized exactly like the frames; None when the
        capture has none (some missing, a still that cannot be read, or of another size, names its file)."""
        import cv2

        paths = self._check_plates(subject)
        if paths is None:
            return None
        width, height = self.image_size(subject)
        plates = {}
        for serial, path in paths.items():
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is None:
                raise CaptureFileError(f"{path}: not a readable image")
            if img.shape[:2] != (height, width):
                raise CaptureFileError(f"{path}: {img.shape[1]}x{img.shape[0]}, but the videos are {width}x{height}")
            plates[serial] = self._postprocess(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), downscale,
                                               self._corrector(subject, serial, 1))
        return plates

    def ground_truth(self, subject: str) -> GroundTruthAccess | None:
        if self.ground_truth_root is None or not (self.ground_truth_root / subject).is_dir():
            return None
        from .ground_truth import SyntheticGroundTruth

        return SyntheticGroundTruth(self.ground_truth_root / subject, self.cameras(subject),
                                    self.subject_dir(subject) / "calibration" / "camera_params.json")
