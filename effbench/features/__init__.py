"""Building blocks of the ``precomputed`` strategy (see ``docs/precomputed.md``).

``bn_adapt``: move BatchNorm running statistics to a new domain without backprop;
``extract``: backbone features of a split as one tensor; ``cache``: the content-addressed,
atomically written, lock-protected feature cache shared by every job of a sweep; ``heads``: the
classifier heads; ``ambiguity``: the ambiguity-weighted loss; ``head_training``: the head's
training loop as tensor ops on cached features.
"""
