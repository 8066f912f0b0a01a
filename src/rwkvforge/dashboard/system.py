"""The System page's report: what the healthcheck (`rwkvforge doctor`) sees.

Uses `rwkvforge.doctor.collect()`; if the doctor itself fails, falls back to what torch
reports so the page still says whether a GPU is visible.

    python -c "from rwkvforge.dashboard.system import report; print(report()['source'])"
"""

from __future__ import annotations

import os
import platform
from typing import Any


def torch_report() -> dict[str, Any]:
    """GPU / CPU as torch alone sees them."""
    import torch

    gpu: dict[str, Any] = {"available": torch.cuda.is_available(), "devices": []}
    if gpu["available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpu["devices"].append({"name": p.name, "vram_gib": round(p.total_memory / 2**30, 1),
                                   "capability": f"{p.major}.{p.minor}"})
    return {
        "source": "torch",
        "status": "unknown",
        "gpu": gpu,
        "torch": {"version": torch.__version__, "cuda_build": torch.version.cuda,
                  "threads": torch.get_num_threads()},
        "os": {"system": platform.system(), "release": platform.release(),
               "machine": platform.machine(), "cpu_count": os.cpu_count()},
        "findings": [],
    }


def report() -> dict[str, Any]:
    try:
        from rwkvforge import doctor

        rep = dict(doctor.collect())
        rep["source"] = "doctor"
        return rep
    except Exception as e:  # the page must still render; say why it fell back
        rep = torch_report()
        rep["doctor_error"] = f"{type(e).__name__}: {e}"
        return rep
