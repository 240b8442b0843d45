"""The references a hold-out render is scored against, both composited on white as the benchmark ships them.

``matte``: the stored (decoded) frame composited with the matting stage's alpha: NeRSemble's protocol, and
all a real capture has. ``synthetic``: a synthetic capture's exact image, re-rendered from its analytic scene
with the rig's true camera (its ``camera_params.json``) at the store's size and the frame's time, with exact
coverage as alpha: no compression and no matting error, so it tells model error apart from matte error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from stages.core.cameras import intrinsics_for_size, read_camera_params
from stages.core.errors import PipelineError
from storage import CaptureStore


@dataclass(frozen=True)
class Reference:
    """A ground-truth image on white (H, W, 3) in [0, 1] and the alpha (H, W) in [0, 1] used to composite it."""

    image: np.ndarray
    alpha: np.ndarray


def composite_on_white(rgb_uint8: np.ndarray, alpha_uint8: np.ndarray) -> Reference:
    a = np.asarray(alpha_uint8, np.float32) / 255.0
    rgb = np.asarray(rgb_uint8, np.float32) / 255.0
    return Reference(image=rgb * a[..., None] + (1.0 - a[..., None]), alpha=a)


def matte_reference(store: CaptureStore, serial: str, t: int) -> Reference:
    return composite_on_white(store.read_frame(serial, t), store.read_alpha(serial, t))


class SyntheticTruth:
    """A synthetic capture's ground truth (``ground_truth.zarr`` beside its videos), checked against the store."""

    def __init__(self, uri: str, store: CaptureStore) -> None:
        self.uri = uri
        try:
            group = zarr.open_group(uri, mode="r")
            alpha = group["alpha"]
        except Exception as error:  # noqa: BLE001 - a missing or foreign folder: say which
            raise PipelineError(f"{uri}: not a synthetic ground_truth.zarr ({type(error).__name__}: {error})") from None
        attrs = dict(group.attrs)
        self.cameras: list[str] = [str(c) for c in attrs.get("cameras", [])]
        self.frame_times: list[float] = [float(t) for t in attrs.get("frame_times", [])]
        self.seed = int(attrs.get("seed", 0))
        self.size = (int(alpha.shape[3]), int(alpha.shape[2]))  # (width, height) the rig's K are for
        calibration = Path(uri).parent.parent.parent / "calibration" / "camera_params.json"
        self.params = read_camera_params(calibration)
        missing = [s for s in store.cameras if s not in self.cameras or s not in self.params.world_2_cam]
        if missing:
            raise PipelineError(f"{uri}: no ground truth for camera(s) {', '.join(missing)} of {store.uri}")
        too_late = [i for i in store.frame_indices if i >= len(self.frame_times)]
        if too_late:
            raise PipelineError(f"{uri}: has {len(self.frame_times)} frames but the store uses source frame "
                                f"{too_late[0]}; is this the same capture?")
        self.store_size = (store.width, store.height)
        self.frame_indices = list(store.frame_indices)

    def reference(self, serial: str, t: int) -> Reference:
        """The exact image of camera ``serial`` at store timestep ``t``, at the store's frame size."""
        from pipeline.synthetic import render_subject

        K = intrinsics_for_size(self.params.intrinsics[serial], self.size, self.store_size)
        time = self.frame_times[self.frame_indices[t]]
        rendered = render_subject(K, self.params.world_2_cam[serial], self.store_size[0], self.store_size[1], time,
                                  seed=self.seed)
        return composite_on_white(rendered.rgb, rendered.alpha)
