"""``latentlink export`` / ``python -m latentlink.export``: turn a trained checkpoint into deployable model files.

Subcommands: ``onnx`` (encoder and decoder as two ONNX files plus model.json, for one profile's input size),
``entropy`` (the probability tables of ``--entropy context``, fitted to the encoder's bits on photos),
``check`` (will an ONNX file parse on the profile's TensorRT: 8.0 on JetPack 4.6, 8.2 on 4.6.1+?), ``engine``
(ONNX -> FP16 TensorRT engine, built on the GPU that runs it), ``compare`` (the same inputs through two backends: how
far apart are they?) and ``bundle`` (one .tar.gz with all a Nano needs: wheel, model, profile, setup script, systemd
unit).

``check``, ``engine`` and ``compare`` run on the Nano's Python 3.6; ``onnx`` needs PyTorch (a workstation).
"""

import argparse
import json
import math
import os
import sys

from latentlink.edge.cli import (ArgumentParser, Number, check_input_dir, check_input_file, check_model_file, check_output_dir,
                                 check_output_file, non_negative_float, positive_int, run_main, sentence)
from latentlink.edge.backends import role_from_name
from latentlink.edge.errors import BackendError, ConfigError
from latentlink.edge.profile import load_profile
from latentlink.edge.tiles import parse_tiles

EXAMPLES = """examples:
  latentlink export onnx --checkpoint runs/lossy-cae.pt --profile nano-504 --out models/nano-504
  latentlink export onnx --checkpoint runs/lossy-cae.pt --height 720 --width 1280 --out models/720p
  latentlink export entropy --checkpoint runs/lossy-cae.pt --photos data/train data/extra --out models/nano-504
  latentlink export check models/nano-504/encoder.onnx models/nano-504/decoder.onnx   (the profile's TensorRT: 8.0)
  latentlink export check --trt 8.2 models/nano-504/encoder.onnx      (a Nano on JetPack 4.6.1+: TensorRT 8.2.1)
  latentlink export engine models/nano-504/encoder.onnx              (on the Nano: FP16, 256 MB workspace)
  latentlink export engine --profile nano-504 --out ~/engines --trtexec   (print the trtexec command only)
  latentlink export compare models/nano-504/encoder.onnx runs/lossy-cae.pt --b-device cuda --b-precision fp16
  latentlink export compare models/nano-504/encoder.onnx ~/engines/encoder.*.fp16.engine --source file://photos/
  latentlink export bundle --profile nano-504 --out latentlink-nano-504.tar.gz      (then README.txt inside it)

regenerate the shipped default models (and nano-1008 likewise):
  latentlink export onnx --checkpoint profiles/default/lossy-cae.pt --profile nano-504 --out profiles/default/nano-504

a progressive model (encoder_step.onnx + decoder_step.onnx, one iteration per call; README "The progressive model"):
  latentlink export onnx --checkpoint profiles/default/progressive.pt --profile progressive-504 \
      --out profiles/default/progressive-504"""


def get_args_parser():
    parser = ArgumentParser(prog="latentlink export", description=__doc__.split(":", 1)[1].strip(), epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", metavar="{onnx,entropy,check,engine,compare,bundle}")
    sub.required = True

    def add(name, help_text):
        return sub.add_parser(name, help=help_text, description=sentence(help_text), epilog=EXAMPLES)

    onnx_parser = add("onnx", "write encoder.onnx + decoder.onnx + model.json (opset 13, static shapes; the "
                              "decoder's batch axis is dynamic, for the host's batches)")
    onnx_parser.add_argument("--checkpoint", required=True, help="a checkpoint written by `latentlink train`")
    onnx_parser.add_argument("--profile", help="take the input size from this profile (name or YAML file)")
    onnx_parser.add_argument("--height", type=positive_int, help="input height in pixels (instead of --profile)")
    onnx_parser.add_argument("--width", type=positive_int, help="input width in pixels (instead of --profile)")
    onnx_parser.add_argument("--out", required=True, help="folder for encoder.onnx, decoder.onnx and model.json")
    onnx_parser.add_argument("--tiles", metavar="RxC", type=tiles_type,
                             help="patch processing: the frame goes through the models as a batch of R x C equal "
                                  "tiles, e.g. 2x2 (the seed deck's 1008 -> 4 x 504); default: the checkpoint's "
                                  "training setting, else 1x1")

    entropy_parser = add("entropy", "fit the tables of --entropy context to the encoder's bits on photos: "
                                    "writes entropy.json beside model.json")
    entropy_parser.add_argument("--checkpoint", required=True, help="the checkpoint the export in --out came from")
    entropy_parser.add_argument("--photos", required=True, nargs="+", metavar="DIR",
                                help="folders of photos (searched recursively), e.g. the training photos")
    entropy_parser.add_argument("--out", required=True,
                                help="the export folder (`export onnx --out`): its model.json gives the input size "
                                     "and tiles; entropy.json goes there")

    check_parser = add("check", "will these ONNX files parse on the target's TensorRT? exit 1 if not")
    check_parser.add_argument("onnx", nargs="+", help="ONNX files")
    check_parser.add_argument("--trt", metavar="VERSION",
                              help="check against this TensorRT's ONNX importer: 8.0 (JetPack 4.6), 8.2 (JetPack "
                                   "4.6.1+), 8.4, 8.5, 8.6 or 10 (tables from onnx-tensorrt's sources, "
                                   "export/trt_ops.py); default: the one --profile's target.jetpack ships")
    check_parser.add_argument("--profile", default="nano-504",
                              help="whose target (target.jetpack) gives the default --trt (default: %(default)s)")
    check_parser.add_argument("--json", help="also write the reports and the Nano time estimate to this JSON file")

    engine_parser = add("engine", "ONNX -> serialized TensorRT engine (+ <engine>.json), reused while it matches")
    engine_parser.add_argument("onnx", nargs="*", help="ONNX files (default: the profile's encoder)")
    engine_parser.add_argument("--profile", default="nano-504",
                               help="profile whose encoder to build when no ONNX is given (default: %(default)s)")
    engine_parser.add_argument("--out", help="folder for the engines (default: beside each ONNX file)")
    engine_parser.add_argument("--fp32", action="store_true", help="build FP32 instead of FP16")
    engine_parser.add_argument("--int8", action="store_true", help=argparse.SUPPRESS)  # refused with the reason
    engine_parser.add_argument("--workspace", type=Number(int, low=16), default=256, metavar="MB",
                               help="builder scratch memory; more than 256 MB gets builds 'Killed' on the Nano "
                                    "(default: %(default)s)")
    engine_parser.add_argument("--force", action="store_true", help="rebuild even if a matching engine exists")
    engine_parser.add_argument("--skip-check", action="store_true",
                               help="do not run `export check` first (it needs the onnx package)")
    engine_parser.add_argument("--trtexec", action="store_true",
                               help="only print the equivalent trtexec command (TensorRT 8.2 flags)")

    compare_parser = add("compare", "the same inputs through two backends: errors and the tolerance that passes")
    compare_parser.add_argument("a", help="reference model file (.onnx, .pt or .engine)")
    compare_parser.add_argument("b", help="model file to check against it")
    compare_parser.add_argument("--role", choices=("encoder", "decoder"),
                                help="which half (default: from A's file name, encoder*/decoder*; else encoder)")
    compare_parser.add_argument("--profile", default="nano-504",
                                help="input size for .pt checkpoints (default: %(default)s)")
    compare_parser.add_argument("--source", default="synthetic://",
                                help="frames for an encoder, any `latentlink edge --source` (default: %(default)s); "
                                     "decoders get random latents")
    compare_parser.add_argument("--count", type=positive_int, default=4, help="inputs (default: %(default)s)")
    compare_parser.add_argument("--atol", type=non_negative_float, default=1e-5,
                                help="absolute tolerance (default: %(default)s)")
    compare_parser.add_argument("--rtol", type=non_negative_float, default=0.0,
                                help="relative tolerance (default: %(default)s)")
    compare_parser.add_argument("--max-flipped", type=Number(float, low=0, high=1), default=1e-3,
                                help="binary latents: the share of bits allowed to flip (default: %(default)s)")
    for side in ("a", "b"):
        compare_parser.add_argument("--{}-device".format(side), default=None,
                                    help="{}'s device: cpu, cuda, cuda:N (.pt), or the GPU index (.engine)".format(
                                        side.upper()))
        compare_parser.add_argument("--{}-precision".format(side), choices=("fp32", "fp16"), default=None,
                                    help="{}'s precision (.pt only; fp16 needs CUDA)".format(side.upper()))
    compare_parser.add_argument("--json", help="also write the figures to this JSON file")

    bundle_parser = add("bundle", "one .tar.gz to flash a Nano: wheel, model, profile, setup.sh, systemd unit")
    bundle_parser.add_argument("--profile", required=True, help="the profile to deploy (name or YAML file)")
    bundle_parser.add_argument("--out", required=True, help="the bundle to write, FILE.tar.gz")
    bundle_parser.add_argument("--checkout", help="the latentlink checkout to build the wheel from (default: the one "
                                                  "this runs from, else the current folder)")
    bundle_parser.add_argument("--check-args", metavar="ARGS",
                               help="more arguments for `latentlink export check` of the encoder, here and in "
                                    "setup.sh on the Nano; give them after =, e.g. --check-args=\"--OPTION VALUE\"")
    bundle_parser.add_argument("--skip-check", action="store_true",
                               help="bundle without running `export check` on the encoder")
    return parser


def tiles_type(text):
    """argparse type: ``RxC``, a grid of tiles (see :func:`latentlink.edge.tiles.parse_tiles`)."""
    try:
        return parse_tiles(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def check_args(args):
    """What argparse cannot check alone: options that exclude each other, and the paths, before any work."""
    if args.command == "onnx":
        check_input_file("--checkpoint", args.checkpoint, "train one with `latentlink train`")
        check_output_dir("--out", args.out)
        sizes = [name for name in ("--height", "--width") if getattr(args, name[2:]) is not None]
        if args.profile and sizes:
            raise ConfigError("--profile {} and {} both give the input size; give --profile, or --height and --width"
                              .format(args.profile, " and ".join(sizes)))
        if not args.profile and len(sizes) != 2:
            raise ConfigError("the input size is missing{}: give --profile NAME, or both --height and --width".format(
                " (only {})".format(sizes[0]) if sizes else ""))
    elif args.command == "entropy":
        check_input_file("--checkpoint", args.checkpoint, "train one with `latentlink train`")
        for folder in args.photos:
            check_input_dir("--photos", folder, "give folders of photos")
        check_input_file("--out", os.path.join(args.out, "model.json"), "export the model there first with "
                         "`latentlink export onnx --out {}`".format(args.out))
    elif args.command in ("check", "engine"):
        if args.command == "check" and args.trt is not None:
            from .trt_ops import resolve_version
            args.trt = resolve_version(args.trt)  # --trt 9.9: a clear error before any file is read
        for path in args.onnx:
            check_input_file("export " + args.command, path, "export one with `latentlink export onnx`")
        if args.command == "check" and args.json:
            check_output_file("--json", args.json)
        if args.command == "engine":
            if args.out:
                check_output_dir("--out", args.out)
    elif args.command == "compare":
        check_model_file("A", args.a, args.role or role_from_name(args.a))
        check_model_file("B", args.b, args.role or role_from_name(args.a))
        if args.json:
            check_output_file("--json", args.json)
    elif args.command == "bundle":
        from .bundle import check_out_path

        check_out_path(args.out)


def main(argv=None):
    return run_main(_main, argv)


def _main(argv):
    args = get_args_parser().parse_args(argv)
    check_args(args)
    return {"onnx": _onnx, "entropy": _entropy, "check": _check, "engine": _engine, "compare": _compare,
            "bundle": _bundle}[args.command](args)


def _onnx(args):
    from .models import load_checkpoint  # PyTorch first: what a machine without the [export] extra lacks first
    from .cost_model import format_estimate
    from .onnx_export import export_onnx

    profile_name = budget_ms = None
    if args.profile:
        profile = load_profile(args.profile)
        height, width, profile_name = profile.input.height, profile.input.width, profile.name
        budget_ms = profile.budget_ms
    else:
        height, width = args.height, args.width
    model, meta = load_checkpoint(args.checkpoint)
    if model.name == "progressive":
        return _onnx_progressive(args, model, height, width, profile_name)
    tiles = args.tiles or tuple(meta.get("tiles", (1, 1)))
    info = export_onnx(model, height, width, args.out, profile=profile_name, checkpoint=args.checkpoint, tiles=tiles,
                       budget_ms=budget_ms)
    parity = info["parity"]
    print("wrote {0}/encoder.onnx, decoder.onnx, model.json: {1[model]} {1[input_shape]} -> {1[latent_shape]} "
          "({1[packing]}, {1[bits_per_pixel]} bpp){2}".format(
              args.out, info, "; {}x{} tiles of each {}x{} frame".format(*tiles, width, height) if tiles != (1, 1)
              else ""))
    if "latent_mismatch_fraction" in parity:
        latents = "{:.2e} of latent values differ".format(parity["latent_mismatch_fraction"])
    else:
        latents = "latent max |error| {:.2e}".format(parity["latent_max_abs_error"])
    print("parity with PyTorch (ONNX Runtime, CPU): {}; decoder max |error| {:.2e}".format(
        latents, parity["decoder_max_abs_error"]))
    print("encoder " + format_estimate(info["estimate"], budget_ms))
    print("next: `latentlink export check {}/encoder.onnx`, then on the Nano `latentlink export engine "
          "{}/encoder.onnx`".format(args.out, args.out))
    return 0


def _onnx_progressive(args, model, height, width, profile_name):
    from .onnx_export import export_progressive

    if args.tiles and tuple(args.tiles) != (1, 1):
        raise ConfigError("--tiles {}x{}: the progressive model codes whole frames (its steps carry state at 1/8 of "
                          "the frame); leave --tiles out".format(*args.tiles))
    info = export_progressive(model, height, width, args.out, profile=profile_name, checkpoint=args.checkpoint)
    section = info["progressive"]
    print("wrote {0}/encoder_step.onnx, decoder_step.onnx, model.json: {1[model]} {1[input_shape]} -> {2[iterations]} "
          "iterations of {2[code_shape]} bits ({2[bits_per_pixel_per_iteration]} bpp each)".format(
              args.out, info, section))
    print("parity with PyTorch (ONNX Runtime, CPU), every iteration: {0[code_mismatch_fraction]:.2e} of bits differ; "
          "max |error| {0[max_abs_error]:.2e}".format(info["parity"]))
    print("next: `latentlink export check {0}/encoder_step.onnx {0}/decoder_step.onnx`".format(args.out))
    return 0


def _entropy(args):
    import hashlib

    from latentlink.edge.backends.base import ModelInfo
    from latentlink.edge.context_model import FILENAME

    from .data import list_images
    from .models import load_checkpoint
    from .rate import fit_context_model

    with open(os.path.join(args.out, "model.json"), encoding="utf-8") as f:
        info = ModelInfo(json.load(f), os.path.join(args.out, "model.json"))
    with open(args.checkpoint, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if info.model_id and info.model_id != digest:
        raise ConfigError("{}/model.json was exported from checkpoint {}..., not {} ({}...): give the checkpoint of "
                          "that export".format(args.out, info.model_id[:12], args.checkpoint, digest[:12]))
    model, _ = load_checkpoint(args.checkpoint)
    photos = sorted({path for folder in args.photos for path in list_images(folder)})
    height, width = info.frame_shape[2], info.frame_shape[3]
    tables = fit_context_model(model, photos, height, width, info.tiles,
                               info={"checkpoint_sha256": digest, "photos_from": list(args.photos)})
    path = os.path.join(args.out, FILENAME)
    tables.save(path)
    print("wrote {}: {} contexts in {} passes, fitted on {} photos at {}x{} ({} symbols); tables sha256 {}".format(
        path, sum(len(t) for t in tables.tables), len(tables.tables), tables.info["photos"], width, height,
        tables.info["symbols"], tables.sha256[:16]))
    print("use: latentlink edge --entropy context (the host needs the same {} beside its decoder)".format(FILENAME))
    return 0


def _check(args):
    from .cost_model import budget_for, estimate_file, format_estimate
    from .onnx_check import check_onnx, format_check

    trt = args.trt or load_profile(args.profile).target.tensorrt
    status, reports = 0, []
    for path in args.onnx:
        report = check_onnx(path, trt)
        print(format_check(report))
        status = status or (0 if report["ok"] else 1)
        # How long the Nano would take (an estimate, never a failure): see export/cost_model.py.
        estimate, reason = estimate_file(path)
        report["estimate"] = estimate
        budget = budget_for(path) if role_from_name(path) == "encoder" else None  # the decoder runs on the host
        print("  " + (format_estimate(estimate, budget) if estimate else "no estimate: " + reason))
        reports.append(report)
    if args.json:
        # "estimate": the encoder's, the half the Nano runs (the first file when none is named encoder*).
        encoders = [r for r in reports if role_from_name(r["path"]) == "encoder"] or reports
        document = {"ok": not status, "estimate": encoders[0]["estimate"], "files": reports}
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1)
        print("wrote {}".format(args.json))
    return status


def _engine(args):
    import os

    from latentlink.edge.backends import role_from_name, trt_api

    from .engine import build_engine, gpu_name, refuse_int8

    onnx_files = args.onnx or [load_profile(args.profile).model.encoder]
    precision = "fp32" if args.fp32 else "fp16"
    if args.int8:  # refused before anything is built or printed (--trtexec too), with this GPU's reason if known
        refuse_int8(gpu_name(), _has_fast_int8(trt_api))
    if args.trtexec:
        for path in onnx_files:
            out = os.path.join(args.out or os.path.dirname(os.path.abspath(path)),
                               os.path.splitext(os.path.basename(path))[0] + "." + precision + ".engine")
            print(trt_api.trtexec_command(path, out, precision, args.workspace))
        return 0
    try:
        trt = trt_api.import_tensorrt()
    except BackendError as exc:
        raise BackendError("{}\nWithout the bindings, `latentlink export engine ... --trtexec` prints the trtexec "
                           "command that builds the same engine".format(exc))
    if not args.skip_check:
        try:
            from .onnx_check import check_onnx, format_check
        except ImportError:
            print("note: the onnx package is not installed, so `export check` is skipped (pip3 install onnx to run "
                  "it, or check on the workstation)")
        else:
            installed = _installed_table(trt)
            for path in onnx_files:
                report = check_onnx(path, installed)
                if not report["ok"]:
                    raise ConfigError("{}\nnot building: fix the graph (or pass --skip-check to try anyway)".format(
                        format_check(report)))
    for path in onnx_files:
        meta = build_engine(path, args.out, precision, args.workspace, force=args.force)
        if not meta["reused"]:
            print("built {engine} in {build_s} s ({engine_bytes:,} bytes; metadata in {engine}.json)".format(**meta))
        if role_from_name(path) == "encoder":
            print("run it: latentlink edge --encoder {} --source csi://0 --connect HOST:5760 --profile {}".format(
                meta["engine"], meta.get("profile") or args.profile))
    return 0


def _installed_table(trt):
    """The operator table for the TensorRT installed here (8.2.1.8 -> 8.2); the oldest (8.0) if none fits."""
    from .trt_ops import OLDEST, resolve_version

    try:
        return resolve_version(getattr(trt, "__version__", OLDEST))
    except ConfigError:
        return OLDEST


def _has_fast_int8(trt_api):
    """Whether this GPU has fast INT8, as TensorRT says; True (the general reason applies) without TensorRT."""
    try:
        trt = trt_api.import_tensorrt()
    except BackendError:
        return True
    return trt.Builder(trt.Logger(trt.Logger.ERROR)).platform_has_fast_int8


def _finite(obj):
    """``obj`` with every non-finite float replaced by None (JSON has no Infinity or NaN)."""
    if isinstance(obj, dict):
        return dict((k, _finite(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _compare(args):
    from latentlink.edge.backends import role_from_name

    from .compare import compare_backends, format_comparison

    role = args.role or role_from_name(args.a)
    profile = load_profile(args.profile)
    size = (profile.input.height, profile.input.width)
    options = dict((side, {"device": getattr(args, side + "_device"), "precision": getattr(args, side + "_precision"),
                           "input_size": size}) for side in ("a", "b"))
    result = compare_backends(args.a, args.b, role, count=args.count, source_uri=args.source, options_a=options["a"],
                              options_b=options["b"], atol=args.atol, rtol=args.rtol, max_flipped=args.max_flipped)
    print(format_comparison(result))
    if args.json:
        with open(args.json, "w") as f:  # strict JSON: an infinite relative error is written as null
            json.dump(_finite(result), f, indent=1)
            f.write("\n")
        print("wrote {}".format(args.json))
    return 0 if result["passed"] else 1


def _bundle(args):
    import os

    from .bundle import build_bundle

    info = build_bundle(args.profile, args.out, checkout=args.checkout, check=not args.skip_check,
                        check_args=args.check_args or "")
    print("wrote {out} ({bytes:,} bytes): latentlink {version} for profile {profile}; encoder {checked}".format(**info))
    print("next: scp {0} to the Nano; there: sudo tar -xzf {1} -C /opt && cd /opt/latentlink && sudo ./setup.sh "
          "(tar -xzOf {0} latentlink/README.txt for the rest)".format(args.out, os.path.basename(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
