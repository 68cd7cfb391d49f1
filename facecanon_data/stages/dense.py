"""Dense COLMAP (undistortion, PatchMatch stereo, fusion) as a child process.

Run as ``python -m facecanon_data.stages.dense COLMAP_DIR IMAGE_DIR CONFIG_JSON``. It is a separate
process because pycolmap's CUDA build aborts (SIGABRT) the whole process on device trouble; the parent
(``reconstruct``) only reads the exit status and marks the timestamp.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def run_dense(col_dir: Path, img_dir: Path, rcfg: dict) -> None:
    import pycolmap

    dense = col_dir / "dense"
    pycolmap.undistort_images(output_path=dense, input_path=col_dir / "sparse", image_path=img_dir)
    pm = pycolmap.PatchMatchOptions()
    pm.window_radius = rcfg["patch_match_window_radius"]
    pm.num_iterations = rcfg["patch_match_num_iterations"]
    pm.geom_consistency = rcfg["patch_match_geom_consistency"]
    pm.filter_min_ncc = rcfg["patch_match_filter_min_ncc"]
    pycolmap.patch_match_stereo(dense, options=pm)
    fu = pycolmap.StereoFusionOptions()
    fu.min_num_pixels = rcfg["fusion_min_num_pixels"]
    fu.max_reproj_error = rcfg["fusion_max_reproj_error"]
    fu.max_depth_error = rcfg["fusion_max_depth_error"]
    fu.max_normal_error = rcfg["fusion_max_normal_error"]
    pycolmap.stereo_fusion(output_path=dense / "fused.ply", workspace_path=dense,
                           input_type="geometric" if rcfg["patch_match_geom_consistency"] else "photometric",
                           options=fu, output_type="PLY")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m facecanon_data.stages.dense COLMAP_DIR IMAGE_DIR CONFIG_JSON", file=sys.stderr)
        return 2
    from ..devices import colmap_cuda_available

    if not colmap_cuda_available():  # checked here too: never reach PatchMatch without a device
        print("no CUDA device with pycolmap-cuda12: PatchMatch stereo is CUDA-only", file=sys.stderr)
        return 3
    run_dense(Path(argv[0]), Path(argv[1]), json.loads(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
