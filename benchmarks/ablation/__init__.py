"""Does shaping the latent manifold beat a reconstruction-only tokenizer at small scale?

    python -m benchmarks.ablation --budget quick|full|dit-long|micro --out runs/ablation [--seeds 0 1]

For each arm — `baseline` (SSR, MCR and SCR weights 0: reconstruction, LPIPS and GAN only, the same
architecture), `ssr`, `mcr`, `scr` (that term alone at the preset's weight) and `pae` (all three) —
the harness drives the training pipeline (`training.stages.pipeline.run_stage`) with the same
budgets and seeds: tokenizer → latents → generator → evaluate. Only the loss weights differ between
arms (`--set tokenizer.<term>_weight=0`), so every difference in the numbers comes from them.

What is shared, because it does not depend on the arm: the frozen VFM's feature cache (`--cache`,
the pipeline's default, so a finished `make train` already holds it), the refined targets of one
`refine` run per seed (copied into each arm that reads them), the conditional-accuracy classifier
(the preset's committed one where the run uses the preset's data: `shipped_classifier`), and the
reference statistics of the real images for the Fréchet distance.

Generation FD follows the evaluate stage's protocol exactly — `gen_samples` class-balanced samples, image
i from seed `gen_seed + i`, the preset's sampler, EfficientNet-Lite2 features against the first
`reference_samples` images of the evaluation split — so the curve's last point, `gen.fd` and
`few_step[<preset steps>]` are one and the same measurement. The report also holds the real-data
floor: the FD that held-out real images score under the same protocol (`real_floor`). The curve is
measured at fixed DiT-step intervals by stopping the DiT stage there (`stop_at`, which checkpoints),
sampling from the EMA weights in its resume state, and resuming: resume is exact, so the arm's DiT is
the one an uninterrupted run would train. Few-step FD re-samples the final EMA DiT with only the Euler step count changed.

Writes `<out>/<name>.json` and `<out>/<name>.png` (`--results-name`, default `ablation`; the
`dit-long` investigation's is `ablation_dit_long`); every budget but `micro` also writes them into
`benchmarks/results/`, and prints the README table (Table 2a layout). Four claims, each the
small-scale bar for one of the paper's, are evaluated in the JSON under `claims`, each with the
numbers it compares, its threshold and whether it holds. Rerunning with the same `--out` resumes:
finished stages are skipped and measured points are kept.

For investigating a claim that does not reproduce, `--arms` picks arms and `--set` changes every
arm alike (`pae.latent_dim=32`, `tokenizer.mcr_angles=30,60`, `tokenizer.steps=600`; a loss weight
such as `tokenizer.ssr_weight=0.5` reaches only the arms that train with that term) — into a new
`--out`, since a directory is tied to the settings it was trained with.

The modules, in the order a run uses them: `budgets` (arms and budgets → `--set` overrides), `plan`
(one invocation's settings and paths), `fd_probe` (generation FD and the real-data floor), `arm` (one
arm at one seed), `aggregate` (over seeds), `claims`, `runner` (the whole run), `report` (JSON, PNG,
table; re-renders a report), `cli`.
"""
