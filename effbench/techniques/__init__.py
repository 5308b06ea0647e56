"""The techniques: one folder (or file) each, selected by ``conf/strategy/<name>.yaml``.

Each technique module registers its class with :func:`effbench.technique.register`; the registry
(``effbench.technique.registered``) imports this package's modules to find them all.
"""
