"""``latentlink export`` / ``python -m export``: turn a trained checkpoint into deployable model files.

Subcommands: ``onnx`` (encoder and decoder as two ONNX files plus model.json, for one profile's input size).
"""

import argparse
import sys

from edge.cli import run_main
from edge.errors import ConfigError
from edge.profile import load_profile

EXAMPLES = """examples:
  latentlink export onnx --checkpoint runs/lossy-cae.pt --profile nano-504 --out models/nano-504
  latentlink export onnx --checkpoint runs/lossy-cae.pt --height 720 --width 1280 --out models/720p

regenerate the shipped default models:
  latentlink export onnx --checkpoint profiles/default/lossy-cae.pt --profile nano-504 --out profiles/default/nano-504
  latentlink export onnx --checkpoint profiles/default/lossy-cae.pt --profile nano-1008 --out profiles/default/nano-1008"""


def get_args_parser():
    parser = argparse.ArgumentParser(prog="latentlink export", description=__doc__.split(":", 1)[1].strip(),
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{onnx}")
    sub.required = True
    onnx_parser = sub.add_parser("onnx", help="encoder.onnx + decoder.onnx + model.json (opset 13, static shapes)",
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    onnx_parser.add_argument("--checkpoint", required=True, help="a checkpoint written by `latentlink train`")
    onnx_parser.add_argument("--profile", help="take the input size from this profile (name or YAML file)")
    onnx_parser.add_argument("--height", type=int, help="input height in pixels (instead of --profile)")
    onnx_parser.add_argument("--width", type=int, help="input width in pixels (instead of --profile)")
    onnx_parser.add_argument("--out", required=True, help="folder for encoder.onnx, decoder.onnx and model.json")
    return parser


def main(argv=None):
    return run_main(_main, argv)


def _main(argv):
    args = get_args_parser().parse_args(argv)
    from .models import load_checkpoint
    from .onnx_export import export_onnx

    profile_name = None
    if args.profile:
        profile = load_profile(args.profile)
        height, width, profile_name = profile.input.height, profile.input.width, profile.name
    elif args.height and args.width:
        height, width = args.height, args.width
    else:
        raise ConfigError("give --profile NAME, or both --height and --width")
    model, _ = load_checkpoint(args.checkpoint)
    info = export_onnx(model, height, width, args.out, profile=profile_name, checkpoint=args.checkpoint)
    parity = info["parity"]
    print(f"wrote {args.out}/encoder.onnx, decoder.onnx, model.json: {info['model']} "
          f"{info['input_shape']} -> {info['latent_shape']} ({info['packing']}, {info['bits_per_pixel']} bpp)")
    print(f"parity with PyTorch (ONNX Runtime, CPU): {parity['latent_mismatch_fraction']:.2e} of latent bits "
          f"differ; decoder max |error| {parity['decoder_max_abs_error']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
