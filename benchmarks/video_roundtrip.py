"""A real video through separate edge and host processes, with the shipped default model (nano-504).

    python benchmarks/video_roundtrip.py [--photo data/holdout/EveningGlow.jpg]

Writes a 2 s, 60-frame 1280x720 MP4 panning across a photo, streams it with `python -m latentlink.edge ... --drop block` to
`python -m latentlink.host --out ...`, then prints the frame counts of both reports and how many saved PNGs are identical to
what the model decodes directly from the same frames (bit-exact latents on the wire make that all of them).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from latentlink.edge.backends import open_backend  # noqa: E402
from latentlink.edge.preprocess import Preprocessor, to_image  # noqa: E402
from latentlink.edge.profile import load_profile  # noqa: E402
from latentlink.edge.sources import open_source  # noqa: E402


def write_pan_video(photo_path, path, frames=60):
    photo = cv2.imread(photo_path)
    if photo is None:
        raise SystemExit("cannot read {} (run scripts/get_photos.sh data, or pass --photo)".format(photo_path))
    h, w = photo.shape[:2]
    small = cv2.resize(photo, (1600, max(770, int(1600 * h / w))), interpolation=cv2.INTER_AREA)
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (1280, 720))
    for i in range(frames):
        writer.write(np.ascontiguousarray(small[50:770, 5 * i:5 * i + 1280]))
    writer.release()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photo", default=os.path.join(ROOT, "data", "holdout", "EveningGlow.jpg"))
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=ROOT)
    with tempfile.TemporaryDirectory() as work:
        video, ready = os.path.join(work, "pan.mp4"), os.path.join(work, "address")
        write_pan_video(args.photo, video)
        host = subprocess.Popen([sys.executable, "-m", "latentlink.host", "--listen", "127.0.0.1:0", "--ready-file", ready,
                                 "--out", work + "/frames", "--report", work + "/host.json", "--max-streams", "1",
                                 "--quiet"], env=env, cwd=ROOT)
        while not os.path.exists(ready):
            time.sleep(0.05)
        subprocess.run([sys.executable, "-m", "latentlink.edge", "--source", "file://" + video, "--connect",
                        open(ready).read().strip(), "--name", "pan", "--drop", "block", "--report",
                        work + "/edge.json", "--quiet"], env=env, cwd=ROOT, check=True)
        host.wait(timeout=300)
        edge, hostr = json.load(open(work + "/edge.json")), json.load(open(work + "/host.json"))
        print("edge: {} captured, {}, {:,.0f} bytes/frame".format(edge["captured"], ", ".join(
            "{} {}".format(n, name) for name, n in edge["outcomes"].items()), edge["bytes_per_frame"]))
        print("host: {frames} decoded, {dropped} gaps, {failed} failed, {protocol_errors} protocol errors".format(
            **hostr))
        profile = load_profile("nano-504")
        preprocess = Preprocessor(profile.input.width, profile.input.height, profile.input.fit)
        same = 0
        with open_backend(profile.model.encoder, "encoder") as enc, \
                open_backend(profile.model.decoder, "decoder") as dec, open_source("file://" + video) as source:
            for seq, (frame, _) in enumerate(source):
                latents, _ = enc.infer(preprocess(frame))
                direct = to_image(dec.infer(latents.copy())[0])
                saved = cv2.imread("{}/frames/pan/{:06d}.png".format(work, seq))
                same += int(saved is not None and np.array_equal(saved, direct))
        print("saved PNGs identical to decoding the same frames directly: {} of {}".format(same, edge["captured"]))


if __name__ == "__main__":
    main()
