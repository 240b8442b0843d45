"""The viewer's server: one viser server, one model, one session per browser tab.

It starts where the rig looks from (the cameras' mean viewing direction and distance, looking at the scene box
centre, the rig's up), listens on 127.0.0.1 unless told otherwise (a warning says who else can reach it), refuses
a port in use instead of taking the next one, and stops on Ctrl-C. A tab that disconnects, even mid-render, only
ends its own session.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from pipeline.viewer.camera import RenderSizes, ViewPose
from pipeline.viewer.keyframes import KeyframeFile
from pipeline.viewer.sequence import ViewerSequence
from pipeline.viewer.scene import initial_pose
from pipeline.viewer.session import Session, SharedRendering
from stages.core.errors import PipelineError
from storage.viewers import announce_viewer, withdraw_viewer


def default_path_file(sequence: ViewerSequence) -> Path:
    """Keyframes beside the sequence's outputs (local work folders), else in the current folder."""
    work = sequence.work
    if work.is_local:
        return Path(work.path("viewer", "camera_path.json"))
    return Path.cwd() / f"camera_path_{work.participant}_{work.sequence}.json"


def check_port(host: str, port: int, sequence_dir: str) -> None:
    """Refuse a port in use with the command that picks another (viser would silently take the next one)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise PipelineError(f"cannot listen on {host}:{port} ({error.strerror or error}; another viewer?); run "
                                f"`nersemble-pipeline view {sequence_dir} --port {port + 1}`") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Viewer:
    """Serves one loaded sequence to any number of tabs."""

    def __init__(self, sequence: ViewerSequence, host: str = "127.0.0.1",
                 port: int = 8080, sizes: RenderSizes | None = None, path_file: Path | None = None,
                 workers: int | None = None) -> None:
        import viser

        self.sequence = sequence
        check_port(host, port, sequence.work.uri)
        with contextlib.redirect_stdout(io.StringIO()):  # viser prints its own banner; ours names the sequence
            self.server = viser.ViserServer(host=host, port=port, verbose=False)
        if port and self.server.get_port() != port:  # lost a race for the port
            self.server.stop()
            raise PipelineError(f"cannot listen on {host}:{port} (in use); run "
                                f"`nersemble-pipeline view {sequence.work.uri} --port {port + 1}`")
        self.host = host
        cams = sequence.cameras
        self.rendering = SharedRendering.for_sequence(sequence, sizes, workers)
        self.keyframes = KeyframeFile(path_file or default_path_file(sequence), (cams.width, cams.height),
                                      sequence.n_timesteps)
        self.initial = initial_pose(sequence)
        self.sessions: dict[int, Session] = {}
        self._sessions_lock = threading.Lock()
        self._configure()
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(self._disconnect)

    @property
    def port(self) -> int:
        return self.server.get_port()

    @property
    def url(self) -> str:
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host  # a wildcard is no address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def _configure(self) -> None:
        server, pose = self.server, self.initial
        server.gui.configure_theme(control_width="medium", show_logo=False, show_share_button=False,
                                   titlebar_content=None)
        up = -ViewPose.of(pose.position, pose.wxyz, pose.fov, pose.aspect).world_2_cam()[1, :3]
        server.scene.set_up_direction(tuple(up))
        server.initial_camera.fov = pose.fov
        server.initial_camera.position = pose.position
        server.initial_camera.look_at = tuple(self.sequence.box_centre)
        server.initial_camera.up = tuple(up)

    def _connect(self, client) -> None:  # noqa: ANN001 - a viser ClientHandle
        session = Session(client, self.sequence, self.rendering, self.keyframes, self.initial)
        with self._sessions_lock:
            self.sessions[client.client_id] = session

    def _disconnect(self, client) -> None:  # noqa: ANN001
        with self._sessions_lock:
            session = self.sessions.pop(client.client_id, None)
        if session is not None:
            session.close()

    def stop(self) -> None:
        with self._sessions_lock:
            sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            session.close()
        with contextlib.redirect_stdout(io.StringIO()):
            self.server.stop()
        self.rendering.pool.shutdown()

    def serve_forever(self) -> None:
        """Until Ctrl-C (or SIGTERM, through ``serve``); then stop every session and the server."""
        try:
            while True:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("stopping the viewer", file=sys.stderr, flush=True)
        finally:
            self.stop()


def serve(sequence_dir: str, host: str = "127.0.0.1", port: int = 8080, device: str = "auto",
          checkpoint: int | None = None, echo=print) -> None:  # noqa: ANN001 - a print-like function
    """``nersemble-pipeline view``: load, say where to look, serve until Ctrl-C."""
    from pipeline.viewer.sequence import open_sequence

    sequence = open_sequence(sequence_dir, device=device, checkpoint=checkpoint)
    viewer = Viewer(sequence, host=host, port=port)
    for warning in sequence.warnings:
        echo(f"warning: {warning}")
    if not is_loopback(host):
        echo(f"warning: listening on {host}: anyone who can reach this machine on port {viewer.port} can view "
             f"this sequence; --host 127.0.0.1 keeps it to this machine")
    echo(f"viewer for {sequence.name} (model step {sequence.trained.step}, {sequence.device}) on {viewer.url} "
         f"(Ctrl-C stops it)")
    if threading.current_thread() is threading.main_thread():  # a service manager's SIGTERM stops it as Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupt)
    announce_viewer(sequence.work, viewer.url)  # the sequence's overview in the Prefect UI links to it meanwhile
    try:
        viewer.serve_forever()
    finally:
        withdraw_viewer(sequence.work)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt
