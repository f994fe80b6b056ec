"""latentlink: learned image compression on the edge (encoder on a Jetson Nano, decoder on a host PC).

Installed, the tools are subpackages: ``latentlink.edge`` (the Nano's side, Python 3.6), ``latentlink.host``,
``latentlink.export`` and ``latentlink.profiles``. In the repository they are the top-level folders ``edge/``,
``host/``, ``export/`` and ``profiles/``: setup.py's ``package_dir`` maps them under ``latentlink`` when it installs,
and in a source checkout (tests, ``PYTHONPATH=.``, the Nano running from a copy of the repository) the two lines
below do the same, so every import reads ``latentlink.edge...`` wherever the code runs.
"""

import os

__version__ = "0.1.0"

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if (not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "edge"))
        and os.path.isfile(os.path.join(_CHECKOUT, "setup.py"))
        and os.path.isfile(os.path.join(_CHECKOUT, "edge", "protocol.py"))):
    __path__.append(_CHECKOUT)  # noqa: F821 (defined by the import system for packages)
