"""Where decoded frames go: the host's outputs (``latentlink host --out URI``, several allowed).

Every decoded frame becomes one :class:`DecodedFrame`; the host's write stage hands it to each of its outputs in
turn (``Output.write``). An output that cannot take a frame raises :class:`OutputError` (a ``LatentlinkError``): the
frame then counts as failed, its acknowledgement says "write error", and the host's log and summary say which output
and why. Outputs are opened once at start-up (``Output.open``: a bad URI, a file where a folder is needed or an
unwritable folder is a ``ConfigError`` with the fix, before any edge connects) and closed once at shutdown
(``Output.close``: finish videos, stop servers).

This module owns the interface; the URI schemes (``file://DIR/``, ``file://NAME.mp4``, ``display://0``) and the
live view (``--view``) are implemented next to it.
"""

import dataclasses
import logging
from typing import Optional

import cv2
import numpy as np

from latentlink.edge.errors import LatentlinkError

log = logging.getLogger("latentlink.host")


class OutputError(LatentlinkError):
    """An output could not take one frame (a disk full, a video writer that failed): that frame counts as failed."""


@dataclasses.dataclass
class DecodedFrame:
    """One decoded frame, as outputs and the Python API's ``Receiver`` see it.

    ``image``: HxWx3 uint8, **BGR** (OpenCV's order: ``cv2.imwrite`` takes it as is). ``latents``: the decoder's
    input as received (unpacked, float32, the decoder's shape). ``t_capture``: UNIX seconds on the edge's clock when
    the frame was captured (None for raw pickles). ``latency_ms``: capture to decoded, on the host's clock corrected
    by the edge's clock offset (None where unknown). ``timings``: this frame's host stages in ms (``receive``,
    ``deserialize``, ``decode``, ``write``, as far as measured when the output sees it), ``bytes``: its size on the
    wire, header included.
    """

    stream: str
    seq: int
    image: np.ndarray
    latents: Optional[np.ndarray] = None
    t_capture: Optional[float] = None
    latency_ms: Optional[float] = None
    timings: dict = dataclasses.field(default_factory=dict)
    bytes: int = 0


class Output:
    """The interface every output implements. ``write`` may be called from several threads at once for frames of
    different streams, never for two frames of one stream at once (the host keeps a stream's frames in order)."""

    uri = ""  # what the user wrote on the command line, for log lines

    def open(self):
        """Check and acquire what the output needs; raise ``ConfigError`` (naming the URI and the fix) if it cannot."""

    def write(self, frame: DecodedFrame):
        """Take one frame; raise :class:`OutputError` if it cannot."""
        raise NotImplementedError

    def close(self):
        """Flush and release; called once, after the last ``write``."""


class FolderOutput(Output):
    """``file://DIR/`` (or a plain ``DIR``): each frame as ``DIR/<stream>/<seq:06d>.png``, written through
    :class:`~latentlink.host.out_dir.OutDir` (no symlink inside ``DIR`` is ever followed; files appear whole)."""

    def __init__(self, out_dir):
        self.out = out_dir  # an OutDir, shared with the host's delivery journal
        self.uri = out_dir.path

    def write(self, frame):
        name = "{:06d}.png".format(frame.seq)
        try:
            encoded, png = cv2.imencode(".png", frame.image)
            if not encoded:
                raise OSError("cv2.imencode could not make a PNG of a {} image".format(frame.image.shape))
            self.out.write(frame.stream, name, png.tobytes())
        except (OSError, cv2.error) as exc:
            raise OutputError("cannot write {}: {}".format(self.out.where(frame.stream, name), exc))
