#!/usr/bin/env python3
"""Chat with a model from the command line (the entry script name Albatross users know).

    python scripts/infer_albatross.py --prompt "What is RWKV?"
    python scripts/infer_albatross.py --base-model models/merged/my.pth         # interactive chat
    python scripts/infer_albatross.py --infer-backend albatross --prompt Hi  # needs CUDA + checkout

Same options as `rwkvforge infer` (see --help); this file only finds the package and calls
rwkvforge.infer.main.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("torch") is None:  # e.g. the system python: use the workspace's
    venv = Path(os.environ.get("VENV_DIR") or ROOT / ".venv") / "bin" / "python"
    if venv.is_file() and Path(sys.prefix).resolve() != venv.parent.parent.resolve():
        os.execv(str(venv), [str(venv), __file__, *sys.argv[1:]])
    sys.exit(f"error: no torch in {sys.executable} and no workspace environment at {venv}: "
             "run ./scripts/bootstrap.sh first")
try:
    import rwkvforge  # noqa: F401  (installed, e.g. by scripts/bootstrap.sh)
except ImportError:  # a plain checkout: use its src/
    sys.path.insert(0, str(ROOT / "src"))

from rwkvforge.infer import main  # noqa: E402 - after the environment check above, on purpose

if __name__ == "__main__":
    raise SystemExit(main())
