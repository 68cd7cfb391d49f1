"""FLAME forward model in torch: blendshapes, static offsets, pose correctives, linear blend skinning.

Batched over timestamps ``T``; the same code runs on CPU and CUDA. Conventions: meters, axis-angle
rotations in radians, joints ordered (global, neck, jaw, left eye, right eye) as in FLAME.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .assets import FlameModel


def axis_angle_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula. (..., 3) axis-angle, radians -> (..., 3, 3) rotation matrices.

    Uses the Taylor expansions of sin(t)/t and (1-cos t)/t^2 near zero so gradients stay finite at 0.
    """
    theta2 = (rotvec * rotvec).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    small = theta2 < 1e-8
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2_safe)
    x, y, z = rotvec.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*rotvec.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand_as(skew)
    return eye + a * skew + b * (skew @ skew)


@dataclass
class FlameParams:
    """Per-timestamp FLAME parameters (T timestamps) plus the per-subject ones.

    shape: (S,) or (T, S) identity coefficients.  expression: (T, E).
    global_rot, neck, jaw, left_eye, right_eye: (T, 3) axis-angle, radians.
    translation: (T, 3) meters, added after skinning.
    offsets: (V, 3) or (T, V, 3) static per-vertex offsets in meters, added before skinning, or None.
    """

    shape: torch.Tensor
    expression: torch.Tensor
    global_rot: torch.Tensor
    neck: torch.Tensor
    jaw: torch.Tensor
    left_eye: torch.Tensor
    right_eye: torch.Tensor
    translation: torch.Tensor
    offsets: torch.Tensor | None = None

    @property
    def num_timestamps(self) -> int:
        return int(self.expression.shape[0])

    def pose(self) -> torch.Tensor:
        """(T, 5, 3) joint rotations in FLAME's joint order."""
        return torch.stack([self.global_rot, self.neck, self.jaw, self.left_eye, self.right_eye], dim=1)

    @classmethod
    def zeros(cls, num_timestamps: int, num_shape: int, num_expression: int,
              dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> "FlameParams":
        def z(*shape):
            return torch.zeros(*shape, dtype=dtype, device=device)

        t = num_timestamps
        return cls(shape=z(num_shape), expression=z(t, num_expression), global_rot=z(t, 3), neck=z(t, 3),
                   jaw=z(t, 3), left_eye=z(t, 3), right_eye=z(t, 3), translation=z(t, 3))

    def to_numpy(self) -> dict[str, np.ndarray]:
        out = {k: getattr(self, k).detach().cpu().numpy() for k in
               ("shape", "expression", "global_rot", "neck", "jaw", "left_eye", "right_eye", "translation")}
        if self.offsets is not None:
            out["offsets"] = self.offsets.detach().cpu().numpy()
        return out

    @classmethod
    def from_numpy(cls, arrays: dict[str, np.ndarray], device: str | torch.device = "cpu") -> "FlameParams":
        def t(name):
            return torch.as_tensor(np.asarray(arrays[name], np.float32), device=device)

        return cls(shape=t("shape"), expression=t("expression"), global_rot=t("global_rot"), neck=t("neck"),
                   jaw=t("jaw"), left_eye=t("left_eye"), right_eye=t("right_eye"), translation=t("translation"),
                   offsets=t("offsets") if "offsets" in arrays else None)


class FlameLayer(torch.nn.Module):
    """FLAME as a differentiable function of :class:`FlameParams`. Buffers follow ``.to(device)``."""

    def __init__(self, model: FlameModel, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        self.register_buffer("v_template", torch.as_tensor(model.v_template, dtype=dtype))
        self.register_buffer("shapedirs", torch.as_tensor(model.shapedirs, dtype=dtype))
        self.register_buffer("exprdirs", torch.as_tensor(model.exprdirs, dtype=dtype))
        self.register_buffer("posedirs", torch.as_tensor(model.posedirs, dtype=dtype))
        self.register_buffer("J_regressor", torch.as_tensor(model.J_regressor, dtype=dtype))
        self.register_buffer("lbs_weights", torch.as_tensor(model.lbs_weights, dtype=dtype))
        self.register_buffer("faces", torch.as_tensor(model.faces, dtype=torch.long))
        self.parents = [int(p) for p in model.parents]

    def rest_vertices(self, params: FlameParams, with_expression: bool = True) -> torch.Tensor:
        """Unposed vertices: template + shape (+ expression) blendshapes + static offsets.

        Returns (T, V, 3) meters.
        """
        t = params.num_timestamps
        shape = params.shape if params.shape.dim() == 2 else params.shape.expand(t, -1)
        v = self.v_template + torch.einsum("vcs,ts->tvc", self.shapedirs[..., : shape.shape[1]], shape)
        if with_expression:
            expr = params.expression
            v = v + torch.einsum("vce,te->tvc", self.exprdirs[..., : expr.shape[1]], expr)
        if params.offsets is not None:
            v = v + params.offsets
        return v

    def forward(self, params: FlameParams, return_joints: bool = False):
        """Posed vertices (T, V, 3) meters in world/capture space (and (T, J, 3) joints if asked).

        Steps: (1) rest shape with offsets; (2) joints regressed from it; (3) pose correctives from
        (R - I) of the non-root joints; (4) rigid chain along the kinematic tree; (5) skinning;
        (6) global translation.
        """
        verts, world, _ = self._pose(params)
        if return_joints:
            return verts, world[..., :3, 3]
        return verts

    def posed_with_transforms(self, params: FlameParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Posed vertices (T, V, 3) m and each joint's rigid rest-to-world transform (T, J, 4, 4),
        translation included: what carries a rigid part attached to a joint (teeth on the jaw)."""
        verts, _, rel = self._pose(params)
        return verts, rel

    def _pose(self, params: FlameParams):
        v_rest = self.rest_vertices(params)  # (1) (T, V, 3)
        joints = torch.einsum("jv,tvc->tjc", self.J_regressor, v_rest)  # (2) (T, J, 3)
        rot = axis_angle_to_matrix(params.pose())  # (T, J, 3, 3)
        eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
        pose_feature = (rot[:, 1:] - eye).flatten(1)  # (3) (T, 9*(J-1))
        v_posed = v_rest + (pose_feature @ self.posedirs).view_as(v_rest)
        world = self._chain(rot, joints)  # (4) (T, J, 4, 4) joint-to-world
        # Transform that moves rest-pose points: world_j @ translate(-joint_j).
        rel = world.clone()
        rel[..., :3, 3] = world[..., :3, 3] - (world[..., :3, :3] @ joints[..., None])[..., 0]
        blend = torch.einsum("vj,tjab->tvab", self.lbs_weights, rel)  # (5) (T, V, 4, 4)
        verts = (blend[..., :3, :3] @ v_posed[..., None])[..., 0] + blend[..., :3, 3]
        verts = verts + params.translation[:, None, :]  # (6)
        world = world.clone()
        world[..., :3, 3] += params.translation[:, None, :]
        rel = rel.clone()
        rel[..., :3, 3] += params.translation[:, None, :]
        return verts, world, rel

    def _chain(self, rot: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        """Compose local rotations about rest joints along the tree: (T, J, 4, 4) joint-to-world."""
        t, j = joints.shape[:2]
        local = torch.zeros(t, j, 4, 4, dtype=rot.dtype, device=rot.device)
        local[..., :3, :3] = rot
        local[..., 3, 3] = 1.0
        offsets = joints.clone()
        parents = self.parents
        offsets[:, 1:] = joints[:, 1:] - joints[:, parents[1:]]
        local[..., :3, 3] = offsets
        world = [local[:, 0]]
        for i in range(1, j):
            world.append(world[parents[i]] @ local[:, i])
        return torch.stack(world, dim=1)

    def canonical_vertices(self, params: FlameParams, template: bool = False) -> torch.Tensor:
        """Canonical mesh, (V, 3) meters: the subject's shape + static offsets, zero expression and pose.

        ``template=True`` also removes identity (mean shape, offsets kept out): one space for all subjects.
        """
        if template:
            return self.v_template.clone()
        p = FlameParams.zeros(1, params.shape.shape[-1], self.exprdirs.shape[-1],
                              dtype=self.v_template.dtype, device=self.v_template.device)
        p.shape = params.shape if params.shape.dim() == 1 else params.shape[0]
        p.offsets = None if params.offsets is None else (params.offsets if params.offsets.dim() == 2 else params.offsets[0])
        return self.rest_vertices(p, with_expression=False)[0]
