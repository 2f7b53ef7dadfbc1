"""Run configurations for `python -m train --config FILE` (model sizes: models/presets.py)."""
