"""``prune``: gradual magnitude pruning (study 003), unstructured masks or whole channels."""
