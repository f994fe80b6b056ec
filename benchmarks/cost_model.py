"""The Nano cost model (export/cost_model.py) against published Jetson Nano TensorRT FP16 latencies.

    python -m benchmarks.cost_model               # the validation table, then every shipped profile vs its budget
    python -m benchmarks.cost_model --calibrate   # refit the two efficiencies on CALIBRATION (ResNet-18/34/50)
    python -m benchmarks.cost_model --layers profiles/default/nano-1008/encoder.onnx   # per node: FLOPs, bytes

The published networks are built here by hand (the torchvision architectures, layer for layer: torchvision itself
does not install beside this project's torch), exported to ONNX at 224x224 like the published runs, and costed
from the ONNX graph alone, as `latentlink export check` costs ours. Needs PyTorch; a few minutes on 1 CPU core
(VGG's 500 MB of weights go through the exporter).
"""

import argparse
import glob
import io
import itertools
import math
import os
import sys
import warnings

import onnx
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from latentlink.export import cost_model  # noqa: E402
from latentlink.export.cost_model import CALIBRATION, JETSON_NANO, SOURCE, VALIDATION, estimate  # noqa: E402


# --- the published networks, as torchvision defines them -----------------------------------------------------------

def conv_bn_relu(cin, cout, k, stride=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*(layers + [nn.ReLU()] if relu else layers))


class ResBlock(nn.Module):
    """torchvision's BasicBlock (``bottleneck=False``) or Bottleneck (expansion 4, stride on the 3x3)."""

    def __init__(self, cin, width, stride, bottleneck):
        super().__init__()
        cout = width * 4 if bottleneck else width
        if bottleneck:
            self.body = nn.Sequential(conv_bn_relu(cin, width, 1), conv_bn_relu(width, width, 3, stride),
                                      conv_bn_relu(width, cout, 1, relu=False))
        else:
            self.body = nn.Sequential(conv_bn_relu(cin, width, 3, stride), conv_bn_relu(width, width, 3, relu=False))
        self.skip = conv_bn_relu(cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet(blocks, bottleneck):
    layers, cin = [conv_bn_relu(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
    for i, n in enumerate(blocks):
        for j in range(n):
            block = ResBlock(cin, 64 * 2 ** i, 2 if j == 0 and i > 0 else 1, bottleneck)
            layers.append(block)
            cin = 64 * 2 ** i * (4 if bottleneck else 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000))


def vgg(config):
    layers, cin = [], 3
    for v in config:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(512 * 49, 4096), nn.ReLU(),
                         nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000))


def alexnet():
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2), nn.AdaptiveAvgPool2d(6),
        nn.Flatten(), nn.Linear(9216, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000))


class Fire(nn.Module):
    def __init__(self, cin, squeeze, e1, e3):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.e1 = nn.Sequential(nn.Conv2d(squeeze, e1, 1), nn.ReLU())
        self.e3 = nn.Sequential(nn.Conv2d(squeeze, e3, 3, padding=1), nn.ReLU())

    def forward(self, x):
        x = self.squeeze(x)
        return torch.cat([self.e1(x), self.e3(x)], 1)


def squeezenet(version):
    pool = nn.MaxPool2d(3, 2, ceil_mode=True)
    if version == "1_0":
        features = [nn.Conv2d(3, 96, 7, 2), nn.ReLU(), pool, Fire(96, 16, 64, 64), Fire(128, 16, 64, 64),
                    Fire(128, 32, 128, 128), pool, Fire(256, 32, 128, 128), Fire(256, 48, 192, 192),
                    Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), pool, Fire(512, 64, 256, 256)]
    else:
        features = [nn.Conv2d(3, 64, 3, 2), nn.ReLU(), pool, Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool,
                    Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool, Fire(256, 48, 192, 192),
                    Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256)]
    return nn.Sequential(*features, nn.Conv2d(512, 1000, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class DenseLayer(nn.Module):
    def __init__(self, cin, growth=32, bn_size=4):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, bn_size * growth, 1, bias=False),
                                  nn.BatchNorm2d(bn_size * growth), nn.ReLU(),
                                  nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def densenet121():
    layers, c = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for i, n in enumerate((6, 12, 24, 16)):
        for _ in range(n):
            layers.append(DenseLayer(c))
            c += 32
        if i < 3:
            layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2)]
            c //= 2
    return nn.Sequential(*layers, nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(c, 1000))


VGG = {"vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
       "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
       "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]}
NETWORKS = {
    "resnet18": lambda: resnet((2, 2, 2, 2), False), "resnet34": lambda: resnet((3, 4, 6, 3), False),
    "resnet50": lambda: resnet((3, 4, 6, 3), True), "resnet101": lambda: resnet((3, 4, 23, 3), True),
    "resnet152": lambda: resnet((3, 8, 36, 3), True), "alexnet": alexnet,
    "squeezenet1_0": lambda: squeezenet("1_0"), "squeezenet1_1": lambda: squeezenet("1_1"),
    "vgg11": lambda: vgg(VGG["vgg11"]), "vgg13": lambda: vgg(VGG["vgg13"]), "vgg16": lambda: vgg(VGG["vgg16"]),
    "densenet121": densenet121,
}


def graph_of(name, size=224):
    """The network's ONNX graph at ``size`` x ``size``, batch 1, its weights' data dropped (only shapes count)."""
    net = NETWORKS[name]().eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, size, size),), buffer, dynamo=False, opset_version=13,
                          do_constant_folding=True)
    model = onnx.load_from_string(buffer.getvalue())
    for tensor in model.graph.initializer:  # keep dims, drop the data: shape inference reads dims only
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
    return model


# --- calibration and the tables ------------------------------------------------------------------------------------

def calibrate(graphs):
    """Grid search of (efficiency, winograd_efficiency) minimising the squared log error on CALIBRATION."""
    best = None
    grid = [round(0.30 + 0.02 * i, 2) for i in range(33)]  # 0.30 .. 0.94
    for eff, wino in itertools.product(grid, grid):
        device = JETSON_NANO._replace(efficiency=eff, winograd_efficiency=wino)
        error = sum(math.log(estimate(graphs[name], device)["ms"] / ms) ** 2 for name, ms in CALIBRATION.items())
        if best is None or error < best[0]:
            best = (error, eff, wino)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibrate", action="store_true", help="refit the efficiencies on CALIBRATION")
    parser.add_argument("--layers", nargs="+", metavar="ONNX", help="print these graphs' FLOPs and bytes per node")
    args = parser.parse_args(argv)
    if args.layers:
        for path in args.layers:
            print_layers(path)
        return 0
    names = list(CALIBRATION) + ([] if args.calibrate else list(VALIDATION))
    graphs = {name: cost_model.load(graph_of(name)) for name in names}
    if args.calibrate:
        error, eff, wino = calibrate(graphs)
        print("efficiency={} winograd_efficiency={} (rms log error {:.3f})".format(
            eff, wino, math.sqrt(error / len(CALIBRATION))))
        return 0
    print("Predicted (this cost model) vs published (torch2trt, Jetson Nano, TensorRT FP16, batch 1, 224x224)")
    print("source: " + SOURCE)
    print("| network | input | GFLOP | predicted ms (range) | published ms | published / predicted | used to |")
    print("|---|---|---|---|---|---|---|")
    inside = 0
    for name in names:
        est = estimate(graphs[name])
        published = CALIBRATION.get(name, VALIDATION.get(name))
        inside += name in VALIDATION and est["low_ms"] <= published <= est["high_ms"]
        print("| {} | 224x224 | {:.2f} | {:.1f} ({:.1f}-{:.1f}) | {} | {:.2f} | {} |".format(
            name, est["gflop"], est["ms"], est["low_ms"], est["high_ms"], published, published / est["ms"],
            "calibrate" if name in CALIBRATION else "validate"))
    print("validation networks inside the predicted range: {} of {}".format(inside, len(VALIDATION)))
    print()
    print_profiles()
    return 0


def print_layers(path):
    """Per node: FLOPs and FP16 bytes (weights, in, out), then the whole graph's estimate."""
    print(path)
    print("| node | op | MFLOP | weights KB | in KB | out KB |")
    print("|---|---|---|---|---|---|")
    for layer in cost_model.layer_costs(path):
        print("| {name} | {op} | {mflop:.1f} | {w:.1f} | {i:.0f} | {o:.0f} |".format(
            mflop=layer["flops"] / 1e6, w=layer["weight_bytes"] / 1e3, i=layer["in_bytes"] / 1e3,
            o=layer["out_bytes"] / 1e3, **layer))
    print(cost_model.format_estimate(estimate(path)))


def print_profiles():
    """Every shipped profile's exported encoder against its budget."""
    from latentlink.edge.profile import load_profile

    print("| profile | encoder | GFLOP | predicted ms (range) | budget ms | verdict |")
    print("|---|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(ROOT, "profiles", "*.yaml"))):
        profile = load_profile(path)
        encoder = profile.model.encoder
        if not os.path.isfile(encoder):
            print("| {} | {} missing (export it first) | | | | |".format(profile.name, encoder))
            continue
        est = estimate(encoder)
        print("| {} | {} | {:.2f} | {:.1f} ({:.1f}-{:.1f}) | {} | {} |".format(
            profile.name, os.path.relpath(encoder, ROOT), est["gflop"], est["ms"], est["low_ms"], est["high_ms"],
            profile.budget_ms, cost_model.verdict(est, profile.budget_ms)))


if __name__ == "__main__":
    sys.exit(main())
