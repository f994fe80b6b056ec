"""latentlink edge: capture frames, encode them to latents and send them to a host.

Runs on a Jetson Nano's Python 3.6 with numpy and JetPack's OpenCV; heavy backends (ONNX Runtime, TensorRT,
PyTorch) are imported only when used. Never imports ``latentlink.host``, and ``latentlink.export`` only for a PyTorch checkpoint (``.pt``).
"""
