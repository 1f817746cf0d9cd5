"""The benchmark suite: `python -m bench` (see bench/__main__.py). Not part of the package."""
