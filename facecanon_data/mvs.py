"""Multi-view stereo with known cameras, in torch: the same code on CPU and CUDA.

COLMAP's PatchMatch stereo exists only in CUDA builds, so without one the pipeline had sparse labels
only. This is the dense backend for every device (``reconstruct.dense = "torch"``), written by hand
because no installable library does calibrated MVS on CPU.

Per reference view (:func:`depth_map`):

1. **Source views**: the ``source_views`` others with the most sparse points in common, each point
   weighted by how well its triangulation angle suits stereo (a Gaussian around ``angle_deg``).
2. **Depth range and extent**: the depths of all sparse points in front of the view widened by
   ``depth_margin_m``; the bounding box of the view's foreground mask (else of the points).
3. **Coarse plane sweep** at 1 / ``coarse_scale`` resolution: ``planes`` fronto-parallel planes uniform
   in inverse depth; photometric cost 1 - NCC over a (2r+1)^2 window of grey levels, per source view,
   aggregated as the mean of the best half of the sources (robust to occlusion), winner takes all.
4. **Refinement**, once per entry of ``refine_scales`` (image size 1 / scale, the last normally 1):
   per-pixel hypotheses around the upsampled depth, ``refine_hypotheses`` of them spanning +-1.5 of the
   previous level's steps (so each level's step is 3 / (hypotheses - 1) of the last). Each pixel's
   window is warped with its neighbours' own hypotheses, so the window follows the current surface
   instead of a fronto-parallel plane. Sub-step depth from a parabola through the best cost and its
   two neighbours.

Then (:func:`fuse`) every depth map is checked against the others: a pixel is kept when at least
``min_consistent_views`` other views' depth maps, projected back, land within
``max_reprojection_px`` and ``max_relative_depth`` of it, and its matching cost is under
``1 - min_ncc``. Kept pixels become points (the mean of the pixel's point and its consistent
neighbours' points), merged on a ``fusion_voxel_m`` grid, with a normal from the depth map's
gradient and a visibility count.

Shapes: images (V, H, W, 3) uint8; depth (V, H, W) float32 metres along the optical axis, 0 = none.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cameras import Camera
from .config import MvsConfig


@dataclass
class DenseCloud:
    """Fused points: positions (N, 3) m, colors (N, 3) uint8, normals (N, 3) unit, visibility (N,) int32
    (views that agree on the point), and the filtered depth maps (V, H, W) float32 m, 0 = none."""

    positions: np.ndarray
    colors: np.ndarray
    normals: np.ndarray
    visibility: np.ndarray
    depth: np.ndarray


def _torch_camera(cam: Camera, device):
    import torch

    k = torch.as_tensor(cam.K, dtype=torch.float32, device=device)
    r = torch.as_tensor(cam.world_2_cam[:3, :3], dtype=torch.float32, device=device)
    t = torch.as_tensor(cam.world_2_cam[:3, 3], dtype=torch.float32, device=device)
    return k, r, t


def _scaled_k(k, scale: float):
    """Intrinsics for an image resized by 1/scale, pixel-centre convention."""
    out = k.clone()
    out[:2, :2] /= scale
    out[:2, 2] = (k[:2, 2] + 0.5) / scale - 0.5
    return out


def select_source_views(cameras: list[Camera], points: np.ndarray, observed: np.ndarray, count: int,
                        angle_deg: float) -> list[list[int]]:
    """Per view, the indices of ``count`` source views: most co-observed sparse points, each weighted by
    a Gaussian (sigma = angle / 2) around ``angle_deg`` of its triangulation angle; views sharing no
    point fall back to the smallest optical-axis angle. points (N, 3) m; observed (N, V) bool."""
    centres = np.stack([c.center for c in cameras])
    axes = np.stack([c.world_2_cam[2, :3] for c in cameras])
    out = []
    for r in range(len(cameras)):
        score = np.zeros(len(cameras))
        for s in range(len(cameras)):
            if s == r:
                continue
            both = observed[:, r] & observed[:, s]
            if both.any():
                a = points[both] - centres[r]
                b = points[both] - centres[s]
                cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
                angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
                score[s] = np.exp(-0.5 * ((angle - angle_deg) / (angle_deg / 2)) ** 2).sum()
            else:
                score[s] = 1e-6 * (1 + axes[r] @ axes[s])
        score[r] = -np.inf
        out.append([int(i) for i in np.argsort(-score, kind="stable")[:count]])
    return out


def _box(x, radius: int):
    """Mean over a (2r+1)^2 window of (N, 1, H, W), separable (two 1-D passes), borders averaged over
    the pixels inside the image."""
    import torch.nn.functional as F

    k = 2 * radius + 1
    x = F.avg_pool2d(x, (1, k), stride=1, padding=(0, radius), count_include_pad=False)
    return F.avg_pool2d(x, (k, 1), stride=1, padding=(radius, 0), count_include_pad=False)


class _Matcher:
    """Photometric cost of depth hypotheses for one reference view at one resolution."""

    def __init__(self, ref, sources, k_ref, r_ref, t_ref, source_cams, radius: int):
        """ref (H, W) grey; sources [(h, w) grey]; cameras as torch (K, R, t) at this resolution."""
        import torch

        h, w = ref.shape
        self.h, self.w, self.radius = h, w, radius
        self.ref = ref[None, None]
        self.mu_r = _box(self.ref, radius)
        self.var_r = (_box(self.ref ** 2, radius) - self.mu_r ** 2).clamp_min(0)
        v, u = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=ref.device),
                              torch.arange(w, dtype=torch.float32, device=ref.device), indexing="ij")
        pix = torch.stack([u, v, torch.ones_like(u)], -1)  # (H, W, 3)
        self.rays = pix @ torch.linalg.inv(k_ref).T  # camera rays with unit z
        self.images = torch.stack([img for img in sources])[:, None]  # (S, 1, h, w); same size per level
        self.k = torch.stack([k for k, _, _ in source_cams])  # (S, 3, 3)
        self.rel_r = torch.stack([r @ r_ref.T for _, r, _ in source_cams])  # reference camera -> source
        self.rel_t = torch.stack([t - (r @ r_ref.T) @ t_ref for _, r, t in source_cams])

    def costs(self, depth):
        """(S, H, W) 1 - NCC per source for per-pixel depths (H, W) m; 2 where a pixel's projection leaves
        the source image or falls behind its camera."""
        import torch
        import torch.nn.functional as F

        x = self.rays * depth[..., None]  # (H, W, 3)
        xs = torch.einsum("hwc,sdc->shwd", x, self.rel_r) + self.rel_t[:, None, None]
        z = xs[..., 2]
        uvw = torch.einsum("shwc,sdc->shwd", xs, self.k)
        uv = uvw[..., :2] / z.clamp_min(1e-6)[..., None]
        sh, sw = self.images.shape[-2:]
        grid = torch.stack([2 * uv[..., 0] / (sw - 1) - 1, 2 * uv[..., 1] / (sh - 1) - 1], -1)
        inside = ((grid.abs() <= 1).all(-1) & (z > 0)).float()[:, None]
        warped = F.grid_sample(self.images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        mu_w = _box(warped, self.radius)
        var_w = (_box(warped ** 2, self.radius) - mu_w ** 2).clamp_min(0)
        cov = _box(warped * self.ref, self.radius) - mu_w * self.mu_r
        ncc = cov / torch.sqrt(var_w * self.var_r + 1e-8)
        return torch.where(inside > 0, 1 - ncc, torch.full_like(ncc, 2.0))[:, 0]

    def aggregate(self, depth):
        """(H, W) cost: mean of the best half of the sources' costs."""
        c = self.costs(depth)
        best = max(1, (len(self.images) + 1) // 2)
        return c.topk(best, dim=0, largest=False).values.mean(0)


def _grey(image):
    """(H, W, 3) uint8 -> (H, W) float32 in [0, 1] torch."""
    import torch

    return torch.as_tensor(image, dtype=torch.float32).mul(1 / 255.0) @ torch.tensor([0.299, 0.587, 0.114])


def _resize(x, scale: int):
    import torch.nn.functional as F

    if scale == 1:
        return x
    return F.avg_pool2d(x[None, None], scale, stride=scale, ceil_mode=True)[0, 0]


def depth_map(ref: int, images, cameras: list[Camera], sources: list[int], z_range: tuple[float, float],
              opts: MvsConfig, box: tuple[int, int, int, int] | None = None, device="cpu"):
    """Depth (H, W) float32 m and cost (H, W) (1 - NCC, aggregated; 2 = not computed) of view ``ref``.

    images: [(H, W, 3) uint8] per view; cameras: per view at the images' resolution; sources: view
    indices; z_range: (near, far) m along the reference optical axis; box: (y0, y1, x0, x1), the part
    of the reference view to compute (the subject's bounding box), None = all of it."""
    import torch

    greys = {i: _grey(images[i]).to(device) for i in [ref] + sources}
    cams = [_torch_camera(c, device) for c in cameras]
    full_h, full_w = greys[ref].shape
    y0, y1, x0, x1 = box if box is not None else (0, full_h, 0, full_w)
    greys[ref] = greys[ref][y0:y1, x0:x1]
    k_crop = cams[ref][0].clone()
    k_crop[0, 2] -= x0
    k_crop[1, 2] -= y0
    cams[ref] = (k_crop, cams[ref][1], cams[ref][2])
    z_near, z_far = z_range

    def matcher(scale: int, radius: int) -> _Matcher:
        imgs = [_resize(greys[i], scale) for i in [ref] + sources]
        ks = [_scaled_k(cams[i][0], scale) for i in [ref] + sources]
        return _Matcher(imgs[0], imgs[1:], ks[0], cams[ref][1], cams[ref][2],
                        [(ks[j + 1], cams[i][1], cams[i][2]) for j, i in enumerate(sources)], radius)

    # coarse plane sweep, winner takes all
    coarse = matcher(opts.coarse_scale, opts.coarse_window_radius)
    inv = torch.linspace(1 / z_near, 1 / z_far, opts.planes, device=device)
    best_cost = torch.full((coarse.h, coarse.w), float("inf"), device=device)
    depth = torch.zeros_like(best_cost)
    for plane in inv:
        d = torch.full_like(best_cost, float(1 / plane))
        c = coarse.aggregate(d)
        better = c < best_cost
        best_cost = torch.where(better, c, best_cost)
        depth = torch.where(better, d, depth)
    depth = _median3(depth)
    del coarse
    # refinement: per level, hypotheses around the upsampled depth spanning +-1.5 current steps
    step_inv = float(inv[0] - inv[1])  # one plane's spacing in inverse depth
    half = (opts.refine_hypotheses - 1) / 2
    offsets = torch.arange(opts.refine_hypotheses, device=device, dtype=torch.float32) - half
    cost, step_scale = None, 1.0
    for scale in opts.refine_scales:
        fine = matcher(scale, opts.window_radius)
        depth = torch.nn.functional.interpolate(depth[None, None], size=(fine.h, fine.w), mode="bilinear",
                                                align_corners=False)[0, 0]
        step_scale *= 1.5 / half
        step = depth ** 2 * step_inv * step_scale
        volume = torch.stack([fine.aggregate(depth + o * step) for o in offsets])  # (K, h, w)
        idx = volume.argmin(0)
        c0 = volume.gather(0, idx[None])[0]
        cm = volume.gather(0, (idx - 1).clamp_min(0)[None])[0]
        cp = volume.gather(0, (idx + 1).clamp_max(len(offsets) - 1)[None])[0]
        curvature = cm - 2 * c0 + cp
        interior = (idx > 0) & (idx < len(offsets) - 1) & (curvature > 1e-6)
        sub = torch.where(interior, 0.5 * (cm - cp) / curvature.clamp_min(1e-6), torch.zeros_like(c0))
        depth = depth + (offsets[idx] + sub.clamp(-0.5, 0.5)) * step
        cost = c0
    h, w = greys[ref].shape
    if depth.shape != (h, w):  # the last level was not the working resolution
        depth = torch.nn.functional.interpolate(depth[None, None], size=(h, w), mode="nearest")[0, 0]
        cost = torch.nn.functional.interpolate(cost[None, None], size=(h, w), mode="nearest")[0, 0]
    depth = torch.where((depth > z_near) & (depth < z_far), depth, torch.zeros_like(depth))
    out_depth = torch.zeros((full_h, full_w), device=device)
    out_cost = torch.full((full_h, full_w), 2.0, device=device)
    out_depth[y0:y1, x0:x1], out_cost[y0:y1, x0:x1] = depth, cost
    return out_depth, out_cost


def subject_box(mask: np.ndarray | None, cam: Camera, points: np.ndarray, margin: float = 0.25):
    """(y0, y1, x0, x1): the part of a view worth matching: the bounding box of its foreground ``mask``
    (H, W) bool when there is one, else that of the sparse ``points`` (N, 3) m projected into it,
    widened by ``margin`` of its size on each side (hair carries few sparse points); clipped to the image."""
    if mask is not None and mask.any():
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    else:
        uv, _ = cam.project(points)
        (x0, y0), (x1, y1) = uv.min(0), uv.max(0) + 1
        dy, dx = margin * (y1 - y0), margin * (x1 - x0)
        y0, y1, x0, x1 = np.floor(y0 - dy), np.ceil(y1 + dy), np.floor(x0 - dx), np.ceil(x1 + dx)
    return (int(max(y0, 0)), int(min(y1, cam.height)), int(max(x0, 0)), int(min(x1, cam.width)))


def _median3(x):
    """3 x 3 median filter of (H, W)."""
    import torch.nn.functional as F

    patches = F.unfold(F.pad(x[None, None], (1, 1, 1, 1), mode="replicate"), 3)  # (1, 9, H*W)
    return patches.median(1).values.view(x.shape)


def depth_ranges(cameras: list[Camera], points: np.ndarray, margin_m: float) -> list[tuple[float, float] | None]:
    """Per view (near, far) m: the depths of all sparse ``points`` (N, 3) m in front of it, 0.5th-99.5th
    percentile, widened by ``margin_m``; all of them, not only those the view observed, so that the back
    of the head and its hair, which carry few points, stay inside. None with fewer than 10 points."""
    out = []
    for cam in cameras:
        _, z = cam.project(points)
        z = z[z > 0]
        if len(z) < 10:
            out.append(None)
            continue
        lo, hi = np.percentile(z, [0.5, 99.5])
        out.append((max(float(lo) - margin_m, 1e-3), float(hi) + margin_m))
    return out


def fuse(images, cameras: list[Camera], depth, cost, opts: MvsConfig, device="cpu") -> DenseCloud:
    """Geometric consistency across views and fusion into one cloud (see module docstring).

    images [(H, W, 3) uint8]; depth, cost (V, H, W) torch; returns the cloud and filtered depth maps."""
    import torch

    n_v, h, w = depth.shape
    cams = [_torch_camera(c, device) for c in cameras]
    v_, u_ = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                            torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
    pix = torch.stack([u_, v_, torch.ones_like(u_)], -1)
    depth = torch.where(cost < 1 - opts.min_ncc, depth, torch.zeros_like(depth))  # only confident depths vote
    world = []  # per view (H, W, 3) world points
    for v, (k, r, t) in enumerate(cams):
        x = (pix @ torch.linalg.inv(k).T) * depth[v][..., None]
        world.append((x - t) @ r)  # R^T (x - t)
    keep_depth = torch.zeros_like(depth)
    positions, colors, normals, visibility = [], [], [], []
    for v, (k, r, t) in enumerate(cams):
        ys, xs = torch.nonzero(depth[v] > 0, as_tuple=True)  # this view's candidate pixels only
        if len(ys) == 0:
            continue
        own, z_own = world[v][ys, xs], depth[v][ys, xs]  # (P, 3), (P,)
        pix_own = torch.stack([xs, ys], -1).float()
        acc, count = own.clone(), torch.zeros(len(ys), device=device)
        for o, (ko, ro, to) in enumerate(cams):
            if o == v:
                continue
            xo = own @ ro.T + to
            zo = xo[:, 2]
            px = torch.round((xo @ ko.T)[:, :2] / zo.clamp_min(1e-6)[:, None]).long()
            inside = (zo > 0) & (px[:, 0] >= 0) & (px[:, 0] < w) & (px[:, 1] >= 0) & (px[:, 1] < h)
            px_x, px_y = px[:, 0].clamp(0, w - 1), px[:, 1].clamp(0, h - 1)
            back = world[o][px_y, px_x]  # the other view's point at that pixel
            xb = back @ r.T + t
            reproj = ((xb @ k.T)[:, :2] / xb[:, 2:3].clamp_min(1e-6) - pix_own).norm(dim=-1)
            rel = (xb[:, 2] - z_own).abs() / z_own
            ok = (inside & (depth[o][px_y, px_x] > 0) & (reproj < opts.max_reprojection_px)
                  & (rel < opts.max_relative_depth))
            acc += torch.where(ok[:, None], back, torch.zeros_like(back))
            count += ok.float()
        good = count >= opts.min_consistent_views
        if not good.any():
            continue
        keep_depth[v, ys[good], xs[good]] = z_own[good]
        positions.append(acc[good] / (count[good] + 1)[:, None])
        colors.append(torch.as_tensor(images[v], device=device)[ys[good], xs[good]])
        normals.append(_depth_normals(world[v], cameras[v].center, device)[ys[good], xs[good]])
        visibility.append(count[good] + 1)
    if not positions:
        z3 = np.zeros((0, 3), np.float32)
        return DenseCloud(z3, z3.astype(np.uint8), z3, np.zeros(0, np.int32), keep_depth.cpu().numpy())
    p = torch.cat(positions).cpu().numpy().astype(np.float64)
    c = torch.cat(colors).cpu().numpy().astype(np.float64)
    n = torch.cat(normals).cpu().numpy().astype(np.float64)
    vis = torch.cat(visibility).cpu().numpy().astype(np.float64)
    p, c, n, vis = _voxel_merge(p, [c, n, vis], opts.fusion_voxel_m)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    return DenseCloud(p, np.clip(c.round(), 0, 255).astype(np.uint8), n.astype(np.float32),
                      np.round(vis).astype(np.int32), keep_depth.cpu().numpy())


def _depth_normals(world, centre: np.ndarray, device):
    """(H, W, 3) unit normals of a view's back-projected depth map (H, W, 3) m, facing the camera
    (central differences, one-sided at the image border)."""
    import torch

    dy, dx = torch.gradient(world, dim=(0, 1))
    n = torch.linalg.cross(dx, dy, dim=-1)
    to_cam = torch.as_tensor(centre, dtype=torch.float32, device=device) - world
    n = torch.where(((n * to_cam).sum(-1) < 0)[..., None], -n, n)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _voxel_merge(points: np.ndarray, attributes: list[np.ndarray], voxel: float):
    """Average points and their attributes per ``voxel``-sized cell (open3d's voxel_down_sample drops
    custom attributes such as visibility, hence by hand). Cells come out in sorted key order."""
    if voxel <= 0 or len(points) == 0:
        return (points, *attributes)
    keys = np.floor(points / voxel).astype(np.int64)
    _, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)

    def mean(a):
        a2 = a.reshape(len(a), -1)
        out = np.stack([np.bincount(inverse, weights=a2[:, j], minlength=len(counts)) for j in range(a2.shape[1])], 1)
        return (out / counts[:, None]).reshape((len(counts),) + a.shape[1:])

    return (mean(points), *[mean(a) for a in attributes])


def reconstruct_dense(images: list[np.ndarray], cameras: list[Camera], points: np.ndarray, observed: np.ndarray,
                      opts: MvsConfig, masks: list[np.ndarray | None] | None = None, device: str = "cpu") -> DenseCloud:
    """Dense cloud and depth maps of one timestamp from its views and sparse points.

    images [(H, W, 3) uint8]; cameras at that resolution; points (N, 3) m, observed (N, V) bool (the
    sparse reconstruction); masks [(H, W) bool foreground or None]: depth outside is dropped."""
    import torch

    n_v = len(cameras)
    h, w = images[0].shape[:2]
    ranges = depth_ranges(cameras, points, opts.depth_margin_m)
    sources = select_source_views(cameras, points, observed, min(opts.source_views, n_v - 1), opts.angle_deg)
    depth = torch.zeros((n_v, h, w), device=device)
    cost = torch.full((n_v, h, w), 2.0, device=device)
    with torch.no_grad():
        for v in range(n_v):
            if ranges[v] is not None:
                mask = masks[v] if masks is not None else None
                box = subject_box(mask, cameras[v], points[observed[:, v]])
                d, c = depth_map(v, images, cameras, sources[v], ranges[v], opts, box, device)
                if mask is not None:
                    d = torch.where(torch.as_tensor(masks[v], device=device), d, torch.zeros_like(d))
                depth[v], cost[v] = d, c
        return fuse(images, cameras, depth, cost, opts, device)
