"""The shipped samples prepared for tests (shared by the training test files)."""

from __future__ import annotations


def prepare_sample(tmp_path_factory, name: str, data_type: str, val_fraction: float):
    """data/samples/<name>.jsonl prepared as `data_type` into a temporary folder; its prefix."""
    from rwkvforge.data.prepare import Options, run
    from rwkvforge.paths import sample_data_dir

    out = tmp_path_factory.mktemp("data") / name
    run(Options(input=sample_data_dir() / f"{name}.jsonl", prefix=out, data_type=data_type, ctx_len=64,
                seed=42, val_fraction=val_fraction, workers=1, progress=False),
        log=lambda *a: None)
    return out
