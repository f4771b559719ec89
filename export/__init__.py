"""torch → ONNX / TensorRT export with a parity gate, written into a versioned model repository.

`exporter.export_checkpoint` is the whole pipeline (`pae-export` is its CLI); `repository` writes and
verifies versions; `parity` holds the per-graph tolerances; `tensorrt` builds engines (optional).
"""
