"""latentlink edge: capture frames, encode them to latents and send them to a host.

Runs on a Jetson Nano's Python 3.6 with numpy and JetPack's OpenCV; heavy backends (ONNX Runtime, TensorRT,
PyTorch) are imported only when used. Never imports ``host`` or ``export``.
"""

__version__ = "0.1.0"
