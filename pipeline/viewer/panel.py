"""The side panel of one tab: what is shown (sequence, step, hold-out scores, device), time, render mode and
overlays, the rig camera comparison and the "save view" button. It only builds widgets and forwards their
events; the session decides what they do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.viewer.compare import Comparison
from pipeline.viewer.frames import MODES
from pipeline.viewer.sequence import ViewerSequence

NO_CAMERA = "(none)"


@dataclass
class PanelActions:
    """What the session does when a widget changes."""

    timestep: Callable[[int], None]
    play: Callable[[bool], None]
    mode: Callable[[str], None]
    box: Callable[[bool], None]
    rig: Callable[[bool], None]
    camera: Callable[[str | None], None]
    reset_view: Callable[[], None]
    save_view: Callable[[], None]


def camera_label(sequence: ViewerSequence, serial: str) -> str:
    return f"{serial} (hold-out)" if sequence.is_holdout(serial) else serial


def summary_markdown(sequence: ViewerSequence, threads: int) -> str:
    """Sequence, model step, hold-out scores and the rendering device, as the panel's first lines."""
    trained, scores = sequence.trained, sequence.scores
    lines = [f"**{sequence.name}**", f"model step {trained.step} · {sequence.n_timesteps} timesteps at "
             f"{sequence.fps:g} fps"]
    if scores is None:
        lines.append("hold-out: not scored yet (`nersemble-pipeline evaluate`)")
    else:
        ssim = "" if scores.ssim is None else f" · SSIM {scores.ssim:.3f}"
        stale = "" if scores.step in (None, trained.step) else f", step {scores.step}"
        lines.append(f"hold-out PSNR {scores.psnr:.2f} dB{ssim} ({scores.source}{stale})")
    device = f"{sequence.device.type}" + (f", {threads} render threads" if sequence.device.type == "cpu" else "")
    lines.append(f"rendering on {device}")
    return "  \n".join(lines)


class Panel:
    def __init__(self, gui: Any, sequence: ViewerSequence, actions: PanelActions, threads: int,
                 path_file: str) -> None:
        self.sequence = sequence
        gui.add_markdown(summary_markdown(sequence, threads))
        self.status = gui.add_markdown("waiting for the first image")
        with gui.add_folder("Time"):
            last = max(sequence.n_timesteps - 1, 1)
            self.timestep = gui.add_slider("timestep", 0, last, 1, 0, disabled=sequence.n_timesteps < 2)
            self.play = gui.add_button("Play", icon="player-play", disabled=sequence.n_timesteps < 2,
                                       hint=f"plays at the capture's {sequence.fps:g} fps")
        with gui.add_folder("Render"):
            self.mode = gui.add_dropdown("mode", MODES, initial_value="colour")
            self.box = gui.add_checkbox("scene box", False)
            self.rig = gui.add_checkbox("rig cameras", True)
            self.reset = gui.add_button("Reset view")
        with gui.add_folder("Rig camera"):
            gui.add_markdown("blue: training, orange: hold-out; click one")
            options = [NO_CAMERA] + [camera_label(sequence, s) for s in sequence.cameras.serials]
            self.camera = gui.add_dropdown("camera", options, initial_value=NO_CAMERA)
            self.compare_label = gui.add_markdown("", visible=False)
            blank = np.full((8, 8, 3), 255, np.uint8)
            self.stored = gui.add_image(blank, label="stored frame", visible=False)
            self.render = gui.add_image(blank, label="render", visible=False)
            self.error = gui.add_image(blank, label="error", visible=False)
        with gui.add_folder("Camera path"):
            self.save = gui.add_button("Save view", icon="camera-plus")
            self.path_note = gui.add_markdown(f"keyframes go to `{path_file}`")
        self._wire(actions)

    def _wire(self, actions: PanelActions) -> None:
        self.timestep.on_update(lambda _: actions.timestep(int(self.timestep.value)))
        self.play.on_click(lambda _: actions.play(self.play.label == "Play"))
        self.mode.on_update(lambda _: actions.mode(self.mode.value))
        self.box.on_update(lambda _: actions.box(self.box.value))
        self.rig.on_update(lambda _: actions.rig(self.rig.value))
        self.reset.on_click(lambda _: actions.reset_view())
        self.camera.on_update(lambda _: actions.camera(self._serial(self.camera.value)))
        self.save.on_click(lambda _: actions.save_view())

    def _serial(self, label: str) -> str | None:
        return None if label == NO_CAMERA else label.split(" ")[0]

    def show_playing(self, playing: bool) -> None:
        self.play.label, self.play.icon = ("Pause", "player-pause") if playing else ("Play", "player-play")

    def show_camera(self, serial: str | None) -> None:
        """The dropdown follows clicks on frusta; the comparison hides when no camera is chosen."""
        label = NO_CAMERA if serial is None else camera_label(self.sequence, serial)
        if self.camera.value != label:
            self.camera.value = label
        if serial is None:
            for handle in (self.compare_label, self.stored, self.render, self.error):
                handle.visible = False

    def show_comparison(self, comparison: Comparison) -> None:
        self.compare_label.content = f"camera **{comparison.serial}** at timestep {comparison.timestep}"
        self.compare_label.visible = True
        self.stored.image, self.stored.visible = comparison.stored, True
        if comparison.render is not None:
            self.render.image, self.render.visible = comparison.render, True
        self.error.visible = comparison.error is not None
        if comparison.error is not None:
            self.error.image = comparison.error
