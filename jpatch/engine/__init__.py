"""The patching engine: plan (NumPy patch grids and packed-row layouts), execute (the compiled
call), sweep (`sweep` and its inputs and baselines), patching (the TransformerLens-shaped
`get_act_patch_*`), aggregate (the normalized mean and `SweepResult`). Imports only model and files."""
