"""Helpers shared by the tests (the CLI's door without its import cost, tiny configs, …)."""
