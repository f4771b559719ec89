"""This service against a plain FastAPI + ONNX Runtime server and Ray Serve: `python -m benchmarks.peers`."""
