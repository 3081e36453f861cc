#!/usr/bin/env python
"""Kept so this path works from a source checkout; the tool itself is
``python -m eve_megatron.tools.import_hf`` (installed: ``eve-import-hf``),
same flags, messages and exit codes."""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, ROOT)
from eve_megatron.tools.import_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
