"""The `make demo` scripts: assets.py builds the model and data, run.py runs the demo."""
