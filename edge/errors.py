"""The one exception family of latentlink.

Every error a user can cause (a bad flag, a bad profile, a missing model, a malformed frame on the wire) is a
:class:`LatentlinkError`. Messages quote the bad value and say what to do instead; entry points catch the family and
exit with one clear line, everything else is a bug and keeps its traceback.
"""


class LatentlinkError(Exception):
    """Base class of every error latentlink raises on purpose."""


class ConfigError(LatentlinkError):
    """A command-line option, profile or model metadata file is invalid."""


class UsageError(ConfigError):
    """The command line does not parse: argparse's message, with the command to ask for help."""


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


class HostRefused(LatentlinkError):
    """The host refused the edge's HELLO: ``reason`` (machine-readable), ``message`` (for a human), ``permanent``.

    A permanent refusal (another model, another latent shape, a stream name in use) stops the edge at once: nothing
    it could retry would change the answer. A transient one (the host is busy) is retried with backoff.
    """

    def __init__(self, reason, message, permanent=True):
        LatentlinkError.__init__(self, message)
        self.reason, self.message, self.permanent = reason, message, permanent
