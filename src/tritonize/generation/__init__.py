"""Fast generation (GitHub issue 4). Placeholder until branch `gen` is merged: this branch adds only t5.py."""
