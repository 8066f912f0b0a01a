"""The System page's report: what the healthcheck (`rwkvforge doctor`) sees.

Uses `rwkvforge.doctor.collect()`; if the doctor itself fails, falls back to what torch
reports so the page still says whether a GPU is visible. `finding_text` gives a finding's
message / fix in the page language.

    python -c "from rwkvforge.dashboard.system import report; print(report()['source'])"
"""

from __future__ import annotations

import os
import platform
from typing import Any

from rwkvforge.dashboard.i18n import t


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
    except Exception as e:  # noqa: BLE001 - the page must still render; say why it fell back
        rep = torch_report()
        rep["doctor_error"] = f"{type(e).__name__}: {e}"
        return rep


def finding_text(finding: dict[str, Any], part: str, lang: str) -> str:
    """A finding's "message" or "fix" in `lang`: the catalogue's "doctor.<key>.<part>" filled
    with the finding's params. The doctor's English text when the finding has no key (a report
    from an older doctor) or the catalogue cannot render it."""
    english = str(finding.get(part) or "")
    key, params = finding.get("key"), finding.get("params")
    if not english or not isinstance(key, str) or not isinstance(params, dict):
        return english
    try:
        return t(lang, f"doctor.{key}.{part}").format(**params)  # format even with no params
    except (KeyError, IndexError, ValueError):
        return english
