"""The fuzz targets (tests/fuzz/targets.py) replayed on their committed seed corpus: every input is either taken
or refused with latentlink's own ProtocolError / ConnectionClosed, never anything else. Fast, in the normal run and
on Python 3.6 (the targets are edge code). The coverage-guided runs themselves: tests/fuzz/fuzz.py and .ci/run."""

import os

import pytest

from .fuzz import targets

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz", "corpus")


def inputs(target):
    folder = os.path.join(CORPUS, target)
    return [(name, os.path.join(folder, name)) for name in sorted(os.listdir(folder))]


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_the_corpus_replays_without_an_unexpected_exception(target):
    pytest.importorskip("lz4")  # the seeds include lz4 and zstd payloads: without the libraries they are refused,
    pytest.importorskip("zstandard")  # which is allowed, but then the replay would not reach the decoders
    refused = taken = 0
    for name, path in inputs(target):
        with open(path, "rb") as f:
            data = f.read()
        if targets.run_one(target, data):  # anything but the two protocol errors propagates and fails the test
            refused += 1
        else:
            taken += 1
    assert refused + taken >= 8


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_the_seed_corpus_is_small_and_has_valid_and_bad_inputs(target):
    files = inputs(target)
    assert sum(os.path.getsize(path) for _, path in files) < 8192
    assert any(name.startswith("bad-") for name, _ in files) and any(not name.startswith("bad-") for name, _ in files)


def test_a_target_reports_what_is_not_a_protocol_error(monkeypatch):
    def broken(data):
        raise IndexError("a parser bug")

    monkeypatch.setitem(targets.TARGETS, "broken", broken)
    with pytest.raises(IndexError):
        targets.run_one("broken", b"")


@pytest.mark.parametrize("name, expected", [("p1-bits", False), ("p1-pickle", False), ("p2-hello", False),
                                            ("bad-seq-2-63", True), ("bad-t-nan", True)])
def test_valid_seeds_are_taken_and_bad_ones_refused(name, expected):
    with open(os.path.join(CORPUS, "frame", name), "rb") as f:
        assert targets.run_one("frame", f.read()) is expected
