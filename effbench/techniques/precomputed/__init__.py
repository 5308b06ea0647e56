"""``precomputed``: a head trained on cached backbone features (study 001; ``docs/precomputed.md``).

``technique``: the technique; ``bn_adapt``: move BatchNorm running statistics to a new domain
without backprop; ``extract``: backbone features of a split as one tensor; ``cache``: the
content-addressed, atomically written, lock-protected feature cache shared by every job of a
sweep; ``lookup``: the cache-hit fast path; ``heads``: the classifier heads; ``ambiguity``: the
ambiguity-weighted loss; ``head_training``: the head's training loop as tensor ops on cached
features; ``batched`` and ``launcher``: many heads of a sweep trained at once
(``hydra/launcher=batched_heads``).
"""
