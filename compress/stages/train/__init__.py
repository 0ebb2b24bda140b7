"""The train stage: config.py (its recipe entry), stage.py (its run, imported when a run reaches it)."""
