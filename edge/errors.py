"""The one exception family of latentlink.

Every error a user can cause (a bad flag, a bad profile, a missing model, a malformed frame on the wire) is a
:class:`LatentlinkError`. Messages quote the bad value and say what to do instead; entry points catch the family and
exit with one clear line, everything else is a bug and keeps its traceback.
"""


class LatentlinkError(Exception):
    """Base class of every error latentlink raises on purpose."""


class ConfigError(LatentlinkError):
    """A command-line option, profile or model metadata file is invalid."""


class SourceError(LatentlinkError):
    """A frame source (camera, video, image folder) cannot be opened or read."""


class BackendError(LatentlinkError):
    """A model file cannot be loaded, or inference got inputs it cannot take."""


class ProtocolError(LatentlinkError):
    """Bytes from the network do not form a valid latentlink frame.

    The receiver closes the one connection that sent them; other connections are unaffected.
    """


class ConnectionClosed(LatentlinkError):
    """The peer closed the connection (cleanly, between frames, or in the middle of one)."""
