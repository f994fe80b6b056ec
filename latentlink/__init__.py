"""latentlink: learned image compression on the edge (encoder on a Jetson Nano, decoder on a host PC).

Installed, the tools are subpackages: ``latentlink.edge`` (the Nano's side, Python 3.6), ``latentlink.host``,
``latentlink.export`` and ``latentlink.profiles``. In the repository they are the top-level folders ``edge/``,
``host/``, ``export/`` and ``profiles/``: setup.py's ``package_dir`` maps them under ``latentlink`` when it installs,
and in a source checkout (tests, ``PYTHONPATH=.``, the Nano running from a copy of the repository) the two lines
below do the same, so every import reads ``latentlink.edge...`` wherever the code runs.
"""

import importlib
import os
import sys

__version__ = "0.1.0"

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if (not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "edge"))
        and os.path.isfile(os.path.join(_CHECKOUT, "setup.py"))
        and os.path.isfile(os.path.join(_CHECKOUT, "edge", "protocol.py"))):
    __path__.append(_CHECKOUT)  # noqa: F821 (defined by the import system for packages)


# The Python API, ``from latentlink import Receiver, Sender``, imported on first use: the Nano (Python 3.6) imports
# this package and must never import the host's code, which needs Python 3.8 and the host's extras. A module-level
# __getattr__ (PEP 562) would say this in three lines, but only from Python 3.7; a module whose class has
# __getattr__ works from 3.5, so the package's class is swapped for one (the import system then asks it for names
# it does not have, ``from latentlink import Sender`` included).
_API = {"Sender": "latentlink.edge.api", "Receiver": "latentlink.host.api"}
__all__ = ["Receiver", "Sender", "__version__"]


class _Package(type(sys)):
    def __getattr__(self, name):
        if name not in _API:
            raise AttributeError("module 'latentlink' has no attribute {!r}".format(name))
        if name == "Receiver" and sys.version_info < (3, 8):  # the Nano: not "No module named 'dataclasses'"
            raise ImportError("latentlink's Receiver is the host's side, which needs Python 3.8+ (this is {}.{}); on "
                              "the edge import only the Sender: from latentlink import Sender".format(
                                  *sys.version_info[:2]))
        return getattr(importlib.import_module(_API[name]), name)

    def __dir__(self):  # what this Python can import: help(latentlink) works on the Nano too
        names = set(_API) if sys.version_info >= (3, 8) else {"Sender"}
        return sorted(set(type(sys).__dir__(self)) | names)


sys.modules[__name__].__class__ = _Package
