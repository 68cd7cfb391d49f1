"""Everything of a synthetic subject that the tracked head model does not hold.

A real head is off the morphable model it is tracked with: hair stands off the scalp, teeth and tongue
show when the jaw opens, a torso in clothing sits below the neck, identity carries detail no shape
coefficient or smooth offset field expresses, and expressions carry detail the expression basis lacks.
This module builds those parts around the head model's mesh so the capture is at least that hard.

Per subject (:func:`build_subject_extras`, drawn from the subject's random stream), in rest space
(the model's canonical frame: meters, x to the subject's left, y up, z out of the face):

- ``detail`` (V, 3): static identity detail along the normals, 0.5-1 mm amplitude at 1-2.5 cm
  wavelength: a field the tracker's offset regulariser is meant to keep out of its smooth offsets.
- ``hair``: a shell 1-4 cm off the scalp (uneven thickness, tapering to the hairline; a fringe over the
  upper forehead for some subjects), carried by the skin's posed normals, so it moves with the head.
- ``teeth`` on the head (upper row) and jaw (lower row) joints, a ``tongue`` on the jaw joint.
- ``torso``: neck collar, shoulders and upper chest on the root (global) joint: it moves rigidly with
  the upper body and is *not head* in the ground truth.

Per frame (:func:`expression_detail`): offsets (T, V, 3) outside the expression basis: an asymmetric
mouth-corner pull, forehead wrinkles that follow the brow raise, a lip roll.

:func:`assemble_frames` poses all of it: one triangle soup per frame (head first, so its vertex ids are
the model's), with a part id and a canonical position per vertex (torso: none).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .procedural import Waves, vertex_normals

PARTS = ("head", "hair", "teeth", "tongue", "torso")
HEAD_PARTS = ("head", "hair", "teeth", "tongue")  # what the canonical ground truth covers
PART_ID = {name: i for i, name in enumerate(PARTS)}
JOINT_ROOT, JOINT_NECK, JOINT_JAW = 0, 1, 2


@dataclass
class SubjectExtras:
    """One subject's parts beyond the head model, in rest space (see module docstring).

    detail: (V, 3) m static identity detail. hair_index: (H,) head vertex ids carrying hair;
    hair_thickness: (H,) m; hair_faces: (Fh, 3) into the hair vertices. rigid_rest: (R, 3) m rest
    positions of the rigid parts (teeth, tongue, torso), rigid_joint (R,) the joint carrying each,
    rigid_part (R,) part id, rigid_faces (Fr, 3) into the rigid vertices. hair_rgb, cloth_rgb: (3,)
    albedo. expression_fields: (K, V, 3) m per unit weight of each per-frame detail field.
    """

    detail: np.ndarray
    hair_index: np.ndarray
    hair_thickness: np.ndarray
    hair_faces: np.ndarray
    rigid_rest: np.ndarray
    rigid_joint: np.ndarray
    rigid_part: np.ndarray
    rigid_faces: np.ndarray
    hair_rgb: np.ndarray
    cloth_rgb: np.ndarray
    fringe: bool
    expression_fields: np.ndarray


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, 1)
    return x * x * (3 - 2 * x)


def _grid_mesh(u: int, v: int, closed_u: bool) -> np.ndarray:
    """Faces (F, 3) of a u x v vertex grid (row-major, u fastest), wrapping in u when ``closed_u``."""
    faces = []
    for j in range(v - 1):
        for i in range(u if closed_u else u - 1):
            a, b = j * u + i, j * u + (i + 1) % u
            c, d = a + u, b + u
            faces += [(a, c, b), (b, c, d)]
    return np.asarray(faces, np.int64)


def _teeth_and_tongue(v: np.ndarray, masks: dict) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """(vertices, faces, joint, part) of the upper and lower tooth rows and the tongue, placed behind
    the lips: rows on an arc 3 cm in radius, their front 2 mm in front of the mouth cavity."""
    lips = v[masks["lips"]]
    mouth_y = float(np.median(lips[:, 1]))
    cavity = v[(np.abs(v[:, 0]) < 0.008) & (np.abs(v[:, 1] - mouth_y) < 0.01) & (v[:, 2] > 0.02)]
    front_z = float(cavity[:, 2].min()) + 0.002 if len(cavity) else float(lips[:, 2].min())
    radius, n_arc = 0.03, 24
    ang = np.linspace(-0.75, 0.75, n_arc)
    out = []
    for sign, joint in ((1, JOINT_NECK), (-1, JOINT_JAW)):
        ys = mouth_y + sign * np.array([0.0008, 0.0075])
        verts = np.array([[radius * np.sin(a), y, front_z - radius * (1 - np.cos(a))] for y in ys for a in ang])
        out.append((verts, _grid_mesh(n_arc, 2, closed_u=False), joint, PART_ID["teeth"]))
    # Tongue: the upper half of a flat ellipsoid resting on the lower row, just behind it.
    th, ph = np.meshgrid(np.linspace(-np.pi, np.pi, 16, endpoint=False), np.linspace(0, np.pi / 2, 5))
    centre = np.array([0.0, mouth_y - 0.009, front_z - 0.006])
    axes = np.array([0.015, 0.006, 0.009])
    tongue = centre + axes * np.stack([np.cos(ph) * np.cos(th), np.sin(ph), np.cos(ph) * np.sin(th)], -1).reshape(-1, 3)
    out.append((tongue, _grid_mesh(16, 5, closed_u=True)[:, ::-1], JOINT_JAW, PART_ID["tongue"]))
    return out


def _torso(rng: np.random.Generator, v: np.ndarray, masks: dict) -> tuple[np.ndarray, np.ndarray]:
    """A collar around the neck that widens into shoulders and an upper chest (open at the bottom)."""
    neck = v[masks["neck"]]
    top_y = float(np.percentile(neck[:, 1], 45))  # the collar covers the lower half of the neck
    cx, cz = float(neck[:, 0].mean()), float(neck[:, 2].mean())
    r_neck = float(np.median(np.hypot(neck[:, 0] - cx, neck[:, 2] - cz))) + 0.006
    half_width = rng.uniform(0.17, 0.21)
    half_depth = rng.uniform(0.10, 0.12)
    rows, cols = 14, 48
    h = np.linspace(0, 1, rows) ** 1.5 * 0.26  # meters below the collar
    grow = _smoothstep(h / 0.07)
    a = r_neck + (half_width - r_neck) * grow
    b = r_neck + (half_depth - r_neck) * grow
    th = np.linspace(0, 2 * np.pi, cols, endpoint=False)
    x = cx + a[:, None] * np.sign(np.cos(th)) * np.abs(np.cos(th)) ** 0.7
    z = cz + b[:, None] * np.sin(th)
    y = top_y - h[:, None] - 0.02 * grow[:, None] * (np.abs(np.cos(th)) ** 2)  # shoulders slope down
    verts = np.stack([x, np.broadcast_to(y, x.shape), z], -1).reshape(-1, 3)
    return verts, _grid_mesh(cols, rows, closed_u=True)


def build_subject_extras(rng: np.random.Generator, template: np.ndarray, rest: np.ndarray, faces: np.ndarray,
                         masks: dict, hair_weight: np.ndarray, detail_mm: float = 0.8) -> SubjectExtras:
    """A subject's extras. template: (V, 3) m the model's template (the detail is a function of it);
    rest: (V, 3) m the subject's rest mesh (shape + smooth offsets) the parts are fitted to;
    hair_weight: (V,) the texture's hair paint."""
    detail = (detail_mm / 1000) * Waves(rng, 24, (0.010, 0.025))(template)[:, None] * vertex_normals(template, faces)
    normals = vertex_normals(rest, faces)
    # Hair: the scalp paint, a fringe on the upper forehead for some subjects, tapering to the hairline.
    fringe = bool(rng.random() < 0.5)
    region = _smoothstep((hair_weight - 0.05) / 0.6)
    if fringe:
        face = np.zeros(len(rest), bool)
        face[masks["face"]] = True
        top = rest[masks["forehead"], 1].max()
        band = _smoothstep((rest[:, 1] - (top - rng.uniform(0.022, 0.03))) / 0.012) * face
        region = np.maximum(region, band * (rest[:, 2] > 0))
    base = rng.uniform(0.012, 0.02) + rng.uniform(0.012, 0.02) * (0.5 + 0.5 * np.tanh(
        Waves(rng, 8, (0.06, 0.12))(rest)))  # 1.2-4 cm, uneven
    thickness = region * base
    thickness[masks["neck"]] = 0.0
    hair = thickness > 0.0015
    face_in = hair[faces].all(1)
    index = np.flatnonzero(hair)
    remap = -np.ones(len(rest), np.int64)
    remap[index] = np.arange(len(index))
    hair_faces = remap[faces[face_in]]
    rigid = _teeth_and_tongue(rest, masks)
    torso_v, torso_f = _torso(rng, rest, masks)
    rigid.append((torso_v, torso_f, JOINT_ROOT, PART_ID["torso"]))
    rigid_vertices, joint, part, rfaces, n = [], [], [], [], 0
    for verts, f, j, p in rigid:
        rigid_vertices.append(verts)
        joint.append(np.full(len(verts), j))
        part.append(np.full(len(verts), p))
        rfaces.append(f + n)
        n += len(verts)
    hair_rgb = np.array([[0.20, 0.13, 0.08], [0.10, 0.08, 0.07], [0.42, 0.30, 0.17], [0.30, 0.17, 0.10]])[
        rng.integers(4)] * rng.uniform(0.9, 1.1, 3)
    cloth_rgb = rng.uniform(0.15, 0.75, 3)
    return SubjectExtras(detail=detail.astype(np.float32), hair_index=index, hair_thickness=thickness[index].astype(np.float32),
                         hair_faces=hair_faces, rigid_rest=np.concatenate(rigid_vertices).astype(np.float32),
                         rigid_joint=np.concatenate(joint), rigid_part=np.concatenate(part).astype(np.int8),
                         rigid_faces=np.concatenate(rfaces), hair_rgb=hair_rgb.astype(np.float32),
                         cloth_rgb=cloth_rgb.astype(np.float32), fringe=fringe,
                         expression_fields=_expression_fields(rng, rest, normals, masks))


def _expression_fields(rng: np.random.Generator, v: np.ndarray, normals: np.ndarray, masks: dict) -> np.ndarray:
    """(3, V, 3) m per unit weight: an asymmetric mouth-corner pull (one side, up and out), forehead
    wrinkles (0.6 mm ridges along the normals, 8-12 mm apart) and a lip roll (lips 2.5 mm inward)."""
    lips = v[masks["lips"]]
    side = 1 if rng.random() < 0.5 else -1
    corner = np.array([side * np.abs(lips[:, 0]).max(), np.median(lips[:, 1]), np.median(lips[:, 2])])
    w = np.exp(-((v - corner) ** 2).sum(1) / 0.018 ** 2)
    pull = w[:, None] * np.array([side * 0.0025, 0.003, -0.001])
    forehead = np.zeros(len(v))
    forehead[masks["forehead"]] = 1.0
    fh = v[masks["forehead"]]
    fw = np.exp(-((v[:, None, :] - fh[None]) ** 2).sum(-1).min(1) / 0.015 ** 2)
    spacing = rng.uniform(0.008, 0.012)
    wrinkles = (0.0006 * np.cos(2 * np.pi * v[:, 1] / spacing) * fw)[:, None] * normals
    lw = np.exp(-((v[:, None, :] - lips[None]) ** 2).sum(-1).min(1) / 0.004 ** 2)
    roll = lw[:, None] * np.array([0.0, 0.0, -0.0025])
    return np.stack([pull, wrinkles, roll]).astype(np.float32)


def expression_detail_weights(rng: np.random.Generator, expression: np.ndarray, brow_raise: int) -> np.ndarray:
    """(T, 3) weights of the per-frame detail fields: corner pull and lip roll in smooth random bumps;
    wrinkles following the brow raise (``brow_raise`` = its expression column)."""
    t = np.arange(len(expression))
    n = max(len(t), 2)
    weights = np.zeros((len(t), 3))
    for k in (0, 2):
        for _ in range(max(1, n // 15)):
            c, half = rng.uniform(0, n), rng.uniform(0.06, 0.15) * n
            weights[:, k] += rng.uniform(0.5, 1.0) * 0.5 * (1 + np.cos(np.pi * np.clip((t - c) / half, -1, 1)))
    weights[:, 1] = np.clip(expression[:, brow_raise], 0, None)
    return np.clip(weights, 0, 1.5).astype(np.float32)


@dataclass
class SceneFrames:
    """Posed subject per frame. vertices: (T, N, 3) float32 m, the first V the head model's;
    faces (F, 3); part (N,) int8 (:data:`PARTS`); canonical (N, 3) float32 m (0 on the torso)."""

    vertices: np.ndarray
    faces: np.ndarray
    part: np.ndarray
    canonical: np.ndarray


def scene_faces_and_parts(extras: SubjectExtras, head_faces: np.ndarray, num_head: int) -> tuple[np.ndarray, np.ndarray]:
    """Faces (F, 3) and part ids (N,) of the assembled scene (head, hair, rigid parts in that order)."""
    nh = len(extras.hair_index)
    faces = np.concatenate([head_faces, extras.hair_faces + num_head, extras.rigid_faces + num_head + nh])
    part = np.concatenate([np.full(num_head, PART_ID["head"]), np.full(nh, PART_ID["hair"]), extras.rigid_part])
    return faces.astype(np.int64), part.astype(np.int8)


def assemble_frames(extras: SubjectExtras, head_vertices: np.ndarray, transforms: np.ndarray,
                    head_faces: np.ndarray, canonical_head: np.ndarray) -> SceneFrames:
    """Pose the extras with the head: head_vertices (T, V, 3) m posed, transforms (T, J, 4, 4) the joints'
    rest-to-world transforms, canonical_head (V, 3) m. Returns the whole subject per frame."""
    head_vertices = np.asarray(head_vertices, np.float32)
    n = vertex_normals(head_vertices, head_faces)[:, extras.hair_index]
    hair = head_vertices[:, extras.hair_index] + n * extras.hair_thickness[None, :, None]
    tr = transforms[:, extras.rigid_joint]  # (T, R, 4, 4)
    rigid = np.einsum("trab,rb->tra", tr[..., :3, :3], extras.rigid_rest) + tr[..., :3, 3]
    vertices = np.concatenate([head_vertices, hair, rigid.astype(np.float32)], 1)
    faces, part = scene_faces_and_parts(extras, head_faces, head_vertices.shape[1])
    cn = vertex_normals(canonical_head.astype(np.float32), head_faces)[extras.hair_index]
    canon_hair = canonical_head[extras.hair_index] + cn * extras.hair_thickness[:, None]
    canon_rigid = np.where((extras.rigid_part == PART_ID["torso"])[:, None], 0.0, extras.rigid_rest)
    canonical = np.concatenate([canonical_head, canon_hair, canon_rigid]).astype(np.float32)
    return SceneFrames(vertices=vertices.astype(np.float32), faces=faces, part=part, canonical=canonical)
