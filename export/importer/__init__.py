"""`pae-import`: the authors' released PAE and LightningDiT checkpoints → this project's checkpoint
directory, which `pae-export` turns into a served model-repository version.

It lives in `export/` because it is the first step of the same path (release files → checkpoint
directory → ONNX repository) and needs only `model/` and the checkpoint format, both of which export
already depends on; putting it in `training/` would make serving the release install the training
stack (datasets, losses, TensorBoard) for no reason.

- `release`: plan (read, infer the preset, account for every tensor) and write the directory
- `sources`, `torch_archive`: reading `.pt` (tensors only, nothing pickled runs), safetensors and
  the diffusers-port folder
- `layout`, `infer`, `check`: the release's tensor names, the architecture the tensors show, the checks
- `vfm_folder`: the frozen DINOv2 inside a tokenizer checkpoint, as a Hugging Face folder
- `synthetic`: random checkpoints in the release layout, for end-to-end checks without real weights
"""

from export.importer.release import ImportPlan, Inputs, import_release, plan_import, write_import

__all__ = ["ImportPlan", "Inputs", "import_release", "plan_import", "write_import"]
