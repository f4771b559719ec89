"""The ONNX Runtime serving path runs without torch: the lean serving image ships none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BLOCK_TORCH = """
import importlib.abc, sys

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test: " + name)

sys.meta_path.insert(0, BlockTorch())
"""

SERVE = """
import numpy as np
import service.app, service.cli, service.worker
from model.sampling import SamplerConfig
from service.runtimes.onnxruntime import OnnxRuntime

runtime = OnnxRuntime(Path(sys.argv[1]), intra_op_threads=1)
for sampler in ("euler", "heun", "sde"):
    images = runtime.generate(np.array([0, 1]), np.array([3, 4]), SamplerConfig(sampler, 4, cfg_scale=2.0))
    assert images.shape == (2, 3, 16, 16) and np.isfinite(images).all()
z = runtime.encode(np.zeros((1, 3, 16, 16), np.float32))
assert runtime.decode(z).shape == (1, 3, 16, 16)
assert "torch" not in sys.modules
print("served without torch")
"""


def test_the_onnxruntime_path_never_imports_torch(tiny_repository: Path) -> None:
    code = BLOCK_TORCH + "from pathlib import Path\n" + SERVE
    version_dir = tiny_repository / "tiny" / "1"
    result = subprocess.run(
        [sys.executable, "-c", code, str(version_dir)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served without torch" in result.stdout
