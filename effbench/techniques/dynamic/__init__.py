"""``dynamic``: dynamic data subsampling (study 002) — the subset schedule and its sampler."""
