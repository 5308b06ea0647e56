"""effbench: config-driven experiments that make cheap CNN training measurable."""

__version__ = "0.1.0"
