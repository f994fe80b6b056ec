"""Coverage-guided fuzzing of latentlink's network parsers with atheris (libFuzzer for Python).

    python -m tests.fuzz.fuzz TARGET [libFuzzer options] [corpus folders]

TARGET is one of ``frame``, ``messages``, ``pickle``, ``entropy``, ``context``, ``lossless`` (see
tests/fuzz/targets.py). Run it from the repository root. libFuzzer writes the inputs it finds new into the first
corpus folder: give it a scratch folder first and the committed seeds second, so the seeds stay as they are::

    python -m tests.fuzz.fuzz frame -max_total_time=3600 -timeout=10 -rss_limit_mb=2048 \\
        /tmp/corpus-frame tests/fuzz/corpus/frame

A crash (an exception other than ProtocolError or ConnectionClosed, a failed check, a timeout, memory over the
limit) stops the run and writes the input to ``crash-<sha1>`` (``-artifact_prefix=DIR/`` to put it elsewhere).
Replay one input with the same command and the file's path; ``tests/test_fuzz_corpus.py`` replays the whole
committed corpus in the normal test run.

Only latentlink's own modules are instrumented (numpy, zlib and the coders' C code are not).
"""

import sys

try:
    import atheris
except ImportError:
    sys.exit("atheris is not installed: pip install atheris (Linux x86-64 wheels; the dev extra installs it there)")

with atheris.instrument_imports(include=["latentlink"]):
    from latentlink.edge import context_model, entropy, protocol, safe_pickle  # noqa: F401 (instrumented as they are imported)

from . import targets  # noqa: E402 (after the instrumented imports: the targets need not be instrumented)


def main(argv):
    if len(argv) < 2 or argv[1] not in targets.TARGETS:
        sys.exit("usage: python -m tests.fuzz.fuzz TARGET [libFuzzer options] [corpus folders]; TARGET is one of "
                 "%s" % ", ".join(sorted(targets.TARGETS)))
    target = targets.TARGETS[argv[1]]

    def one(data):
        try:
            target(data)
        except targets.ALLOWED:
            pass

    atheris.Setup([argv[0]] + argv[2:], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
