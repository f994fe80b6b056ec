"""``latentlink demo``: a host and an edge on loopback stream real photos through the default model.

The host and the edge run as two processes, exactly as ``latentlink host`` and ``latentlink edge`` would on two
machines. Afterwards the demo prints both per-stage tables, the bytes each frame cost on the wire, and the PSNR of
what the host decoded against what the edge captured.
"""

import os
import shutil
import subprocess
import sys
import time

EXAMPLES = """examples:
  latentlink demo
  latentlink demo --profile nano-1008 --frames 30 --out /tmp/demo
  latentlink demo --photos my-photos/"""

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def get_args_parser():
    from latentlink.edge.cli import ArgumentParser, positive_float, positive_int

    parser = ArgumentParser(prog="latentlink demo", description=__doc__.split(":", 1)[1].strip(), epilog=EXAMPLES)
    parser.add_argument("--profile", default="nano-504", help="profile to run (default: %(default)s)")
    parser.add_argument("--frames", type=positive_int, default=40, help="frames the edge sends (default: %(default)s)")
    parser.add_argument("--photos", help="folder of photos to stream (default: scikit-image's sample photos, "
                                         "which the default model was not trained on)")
    parser.add_argument("--out", default="latentlink-demo", help="folder for reports and images (default: %(default)s)")
    parser.add_argument("--timeout", type=positive_float, default=300.0, help="give up after this many seconds")
    parser.add_argument("--quiet", action="store_true", help="no progress bar while the frames stream")
    return parser


def main(argv=None):
    from latentlink.edge.cli import run_main

    return run_main(_main, argv)


def _main(argv):
    from latentlink.edge.errors import ConfigError, LatentlinkError
    from latentlink.edge.profile import load_profile
    from latentlink.edge.profiler import format_report, load_report

    from latentlink.edge.cli import check_input_dir, check_output_dir

    args = get_args_parser().parse_args(argv)
    if args.photos:
        check_input_dir("--photos", args.photos, "give a folder of photos, or leave --photos out for the samples")
    check_output_dir("--out", args.out)
    profile = load_profile(args.profile)
    out = os.path.abspath(args.out)
    frames_dir, ready = os.path.join(out, "frames"), os.path.join(out, "host.address")
    edge_report, host_report = os.path.join(out, "edge.json"), os.path.join(out, "host.json")
    os.makedirs(out, exist_ok=True)
    for stale in (ready, edge_report, host_report):
        if os.path.exists(stale):
            os.remove(stale)
    shutil.rmtree(frames_dir, ignore_errors=True)  # frames of an earlier run would count in the PSNR
    photos = args.photos
    if not photos:
        photos = write_sample_photos(os.path.join(out, "photos"))
        print(f"wrote {len(SAMPLE_PHOTOS)} sample photos (scikit-image's) to {photos}")

    python = [sys.executable, "-m"]
    print(f"starting the host ({args.profile}: loading the decoder) ...", flush=True)
    host = subprocess.Popen(python + ["latentlink.host", "--listen", "127.0.0.1:0", "--ready-file", ready, "--profile",
                                      args.profile, "--out", frames_dir, "--report", host_report, "--max-streams",
                                      "1", "--quiet"])
    edge = None
    started = time.monotonic()
    try:
        address = wait_for_file(ready, host, args.timeout)
        print(f"host listening on {address}; starting the edge: {args.frames} frames of {photos} ...", flush=True)
        # --drop block: every frame reaches the host, so each PSNR below has a frame to compare. A live camera
        # would use the profile's 'oldest' policy and count the frames it drops.
        edge = subprocess.Popen(python + ["latentlink.edge", "--source", "file://" + photos, "--loop", "--frames",
                                          str(args.frames), "--connect", address, "--name", "demo", "--profile",
                                          args.profile, "--drop", "block", "--report", edge_report, "--quiet"])
        wait_for_frames(edge, os.path.join(frames_dir, "demo"), args.frames, started + args.timeout, args.quiet)
        if edge.wait(timeout=max(0.1, started + args.timeout - time.monotonic())) != 0:
            raise LatentlinkError(f"the edge exited with code {edge.returncode} (see its messages above)")
        print("edge done; waiting for the host to finish ...", flush=True)
        if host.wait(timeout=max(0.1, started + args.timeout - time.monotonic())) != 0:
            raise LatentlinkError(f"the host exited with code {host.returncode} (see its messages above)")
    except subprocess.TimeoutExpired:
        raise ConfigError(f"the demo did not finish in {args.timeout:.0f} s (raise --timeout on a slow machine)")
    finally:
        for proc in (edge, host):
            if proc is not None and proc.poll() is None:
                proc.kill()

    edge_summary, host_summary = load_report(edge_report, records=False), load_report(host_report, records=False)
    print()
    print(format_report(edge_summary))
    print()
    print(format_report(host_summary))
    scores = decoded_psnr(photos, os.path.join(frames_dir, "demo"), profile)
    print()
    print(f"wire: {edge_summary['bytes_per_frame']:,.0f} bytes per frame for a {profile.input.width}x"
          f"{profile.input.height} RGB frame ({profile.input.width * profile.input.height * 3:,} bytes raw, "
          f"{8 * edge_summary['bytes_per_frame'] / (profile.input.width * profile.input.height):.3f} bits per pixel "
          f"with the header)")
    if scores:
        print(f"quality: PSNR {sum(scores.values()) / len(scores):.2f} dB (RGB, 8-bit) of the host's images against "
              f"the edge's input, over {len(scores)} photos: " +
              ", ".join(f"{name} {value:.2f}" for name, value in sorted(scores.items())))
    print(f"reports: {edge_report}, {host_report} (print them again with `latentlink report`)")
    print(f"images:  {frames_dir}/demo/<seq>.png")
    return 0


def write_sample_photos(folder):
    """Write scikit-image's colour sample photos as PNG files into ``folder``; returns the folder."""
    try:
        import skimage.data
    except ImportError:
        from latentlink.edge.errors import ConfigError

        raise ConfigError("latentlink demo: scikit-image is not installed, and the demo's photos come from it; "
                          "`latentlink demo` needs the [host] extra: pip install \".[host]\" in the latentlink "
                          "folder; or pass --photos DIR")
    import cv2

    os.makedirs(folder, exist_ok=True)
    for name in SAMPLE_PHOTOS:
        rgb = getattr(skimage.data, name)()
        cv2.imwrite(os.path.join(folder, f"{name}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return folder


PROGRESS_S = 5.0  # seconds between the progress lines printed where no progress bar shows


def wait_for_frames(edge, folder, frames, deadline, quiet=False):
    """While the edge runs: a progress bar of the frames the host has written to ``folder`` (on stderr, where it
    is a terminal). Returns when the edge exits or at ``deadline`` (time.monotonic())."""
    from latentlink.edge.cli import progress

    bar = progress(quiet=quiet, total=frames, desc="frames decoded", unit="frame")
    plain = not quiet and getattr(bar, "disable", True)  # no bar (not a terminal): a line every few seconds
    done, started = 0, time.monotonic()
    next_line = started + PROGRESS_S
    while edge.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        now = len([n for n in os.listdir(folder) if n.endswith(".png")]) if os.path.isdir(folder) else 0
        bar.update(now - done)
        done = now
        if plain and time.monotonic() >= next_line:
            print(f"  {done}/{frames} frames decoded ({done / (time.monotonic() - started):.1f} frames/s)",
                  flush=True)
            next_line += PROGRESS_S
    bar.close()


def wait_for_file(path, process, timeout):
    """Wait for the host to write its address to ``path``; returns it."""
    from latentlink.edge.errors import LatentlinkError

    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process.poll() is not None:
            raise LatentlinkError(f"the host exited with code {process.returncode} before listening")
        if time.monotonic() > deadline:
            raise LatentlinkError(f"the host did not start listening within {timeout:.0f} s")
        time.sleep(0.05)
    with open(path) as f:
        return f.read().strip()


def decoded_psnr(photos, frames_dir, profile):
    """Mean PSNR (dB) per photo of the host's saved frames against the edge's preprocessed input.

    The edge streamed the photos in name order, looping, so frame ``seq`` shows photo ``seq % len(photos)``.
    """
    import cv2

    from latentlink.edge.preprocess import fit_frame, psnr
    from latentlink.edge.sources import open_source

    references, names = [], []
    with open_source("file://" + photos) as source:
        for frame, _ in source:  # the images that decode, as the edge streamed them
            references.append(fit_frame(frame, profile.input.width, profile.input.height, profile.input.fit))
            names.append(os.path.splitext(os.path.basename(source.current_path))[0])
    per_photo = {}
    for name in sorted(os.listdir(frames_dir)) if os.path.isdir(frames_dir) else []:
        seq = int(os.path.splitext(name)[0])
        decoded = cv2.imread(os.path.join(frames_dir, name))
        per_photo.setdefault(seq % len(references), []).append(psnr(references[seq % len(references)], decoded))
    return {names[k]: sum(v) / len(v) for k, v in per_photo.items()}
