# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "rwkvforge",
#     "marimo",
# ]
# ///
"""Preference-tuning walkthrough: SFT adapter -> merge -> a fresh DPO adapter on the merged
model -> reward curves, through the rwkvforge package's public API (what `rwkvforge train`,
`rwkvforge merge` and `rwkvforge eval` call). The twin of sft_walkthrough.py.

    marimo edit notebooks/dpo_walkthrough.py     # interactive
    python notebooks/dpo_walkthrough.py          # headless: runs every cell, fails on error

Outputs go to the workspace (RWKVFORGE_ROOT, else this checkout): data/processed/ and
runs/dpo-walkthrough-<time>-sft/ (with merged/) and runs/dpo-walkthrough-<time>-dpo/.
Small settings: a few minutes on 2 CPU cores.

Model and data come from the same settings as `rwkvforge train`: BASE_MODEL (unset: the demo
model), DATA_FILE for the stage its DATA_TYPE names (sft or dpo; the other stage, or both when
DATA_FILE is unset, uses the shipped sample). marimo comes with `./scripts/bootstrap.sh` (the
`notebooks` extra); in another environment: `pip install "marimo>=0.9"`.
"""

import marimo

__generated_with = "0.25.0"
app = marimo.App(width="medium")


@app.cell
def _():
    import marimo as mo

    return (mo,)


@app.cell
def _(mo):
    mo.md(
        r"""
        # Preference tuning: SFT → merge → DPO

        The usual recipe: teach the model the task with supervised examples (an SFT LoRA),
        merge that adapter into the weights, then train a **fresh** adapter on the merged model
        with preference pairs (`{"prompt", "chosen", "rejected"}`) by DPO. DPO's reference
        model is the merged SFT model as it starts, so the reward curves below measure how far
        the policy moves from it, towards the chosen answers.

        Your own model and data: set `BASE_MODEL` and `DATA_FILE` / `DATA_TYPE` in
        `configs/workspace.env` (or the environment), as for `rwkvforge train`.
        marimo missing? `./scripts/bootstrap.sh` installs it (the `notebooks` extra), or
        `pip install "marimo>=0.9"` in your environment.
        """
    )
    return


@app.cell
def _():
    import datetime
    import json

    import torch

    from rwkvforge import config, paths
    from rwkvforge.data.prepare import SAMPLES

    root = paths.workspace_root()
    mine = config.resolve(root=root)  # workspace.env + environment, as `rwkvforge train` sees

    def data_for(kind):
        """DATA_FILE when DATA_TYPE names this stage, else the shipped sample of its kind."""
        s0 = mine.settings
        if s0.data_file and s0.data_type == kind:
            return paths.resolve(s0.data_file, mine.sources["DATA_FILE"], root)
        return paths.sample_data_dir(root) / SAMPLES[kind]

    stamp = "dpo-walkthrough-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    # without a BASE_MODEL, the demo model's layer (configs/model/rwkv7-tiny.env)
    model_layer = None if mine.settings.base_model else "rwkv7-tiny"
    precision = "fp32" if not torch.cuda.is_available() else "bf16"
    sft_file, dpo_file = data_for("sft"), data_for("dpo")
    return config, dpo_file, json, model_layer, precision, root, sft_file, stamp


@app.cell
def _(config, mo, model_layer, precision, root, sft_file, stamp):
    from rwkvforge.train import Trainer

    # 1. SFT: a LoRA adapter on the base model (small on purpose: minutes on a CPU)
    sft_res = config.resolve(
        model=model_layer, profile="lora-bf16", root=root,
        cli={"data_type": "sft", "data_file": str(sft_file), "precision": precision,
             "ctx_len": 128, "micro_bsz": 2, "max_steps": 4, "warmup_steps": 1,
             "save_every": 0, "lr": 1e-3, "run_name": stamp + "-sft"})
    sft_dir = root / sft_res.settings.runs_dir / (stamp + "-sft")
    sft_trainer = Trainer(sft_res, sft_dir, root=root, progress=False)
    sft_result = sft_trainer.run()
    _val = ("no validation split (VAL_FRACTION=0)" if sft_result.val_loss_end is None else
            f"validation loss {sft_result.val_loss_start:.4f} → {sft_result.val_loss_end:.4f}")
    mo.md(f"## 1. SFT\n\n`{sft_file.name}`, {sft_result.step} steps: {_val}. "
          f"Run folder: `{sft_dir}`.")
    return Trainer, sft_dir, sft_trainer


@app.cell
def _(mo, sft_dir, sft_trainer):
    from rwkvforge.merge import merge

    # 2. merge: base + SFT adapter -> one .pth (fp32: exact), verified against peft's unmerged
    # model; `rwkvforge merge` also runs it in the rwkv pip package (skipped here for time)
    merged = merge(sft_trainer.inputs.model_path, sft_dir / "adapter", dtype_name="fp32",
                   runtime_check=False, log=lambda *a: None)
    _c = merged.report["checks"]["logits"]
    mo.md(f"## 2. Merge\n\n`{merged.output}`: max |merged − (base + adapter)| = "
          f"{_c['max_abs_diff']:.3g} (tolerance {_c['tolerance']:.3g}).")
    return (merged,)


@app.cell
def _(Trainer, config, dpo_file, merged, mo, precision, root, stamp):
    # 3. DPO: a fresh adapter on the merged model; its reference = the merged model
    dpo_res = config.resolve(
        profile="lora-bf16", root=root,
        cli={"base_model": str(merged.output), "data_type": "dpo", "data_file": str(dpo_file),
             "precision": precision, "ctx_len": 160, "micro_bsz": 4, "max_steps": 6,
             "warmup_steps": 0, "save_every": 0, "eval_every": 3, "log_every": 1, "lr": 3e-3,
             "dpo_beta": 0.2, "val_fraction": 0.15, "run_name": stamp + "-dpo"})
    dpo_dir = root / dpo_res.settings.runs_dir / (stamp + "-dpo")
    dpo_result = Trainer(dpo_res, dpo_dir, root=root, progress=False).run()
    mo.md(f"## 3. DPO\n\n`{dpo_file.name}` on `{merged.output.name}`, {dpo_result.step} "
          f"steps: held-out DPO loss {dpo_result.val_loss_start:.4f} (ln 2 = the reference "
          f"itself) → {dpo_result.val_loss_end:.4f}. Run folder: `{dpo_dir}`.")
    return (dpo_dir,)


@app.cell
def _(dpo_dir, json, mo):
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 4. the reward curves: per step, the share of pairs whose chosen answer the policy
    # prefers more than the reference does (reward accuracy) and the mean reward margin
    _rows = [json.loads(x) for x in (dpo_dir / "metrics.jsonl").read_text().splitlines()]
    _steps = [r["step"] for r in _rows if "reward_margin" in r]
    _fig, (_a, _b) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    _a.plot(_steps, [r["reward_acc"] for r in _rows if "reward_margin" in r], label="train")
    _val = [(r["step"], r["val_reward_acc"]) for r in _rows if "val_reward_acc" in r]
    if _val:
        _a.plot(*zip(*_val), "o-", label="held-out")
    _a.set(xlabel="step", ylabel="reward accuracy", ylim=(-0.05, 1.05))
    _a.legend()
    _b.plot(_steps, [r["reward_margin"] for r in _rows if "reward_margin" in r])
    _b.axhline(0.0, color="grey", lw=0.8)
    _b.set(xlabel="step", ylabel="mean reward margin (beta x log-ratio)")
    for _ax in (_a, _b):
        _ax.grid(alpha=0.3)
        _ax.xaxis.get_major_locator().set_params(integer=True)
    _fig.tight_layout()
    reward_png = dpo_dir / "rewards.png"
    _fig.savefig(dpo_dir / ".rewards.png.tmp", format="png")
    plt.close(_fig)
    os.replace(dpo_dir / ".rewards.png.tmp", reward_png)
    mo.vstack([mo.md("## 4. Reward curves"), mo.image(str(reward_png))])
    return


@app.cell
def _(dpo_dir, merged, mo):
    from rwkvforge import runs
    from rwkvforge.evaluate import evaluate, render_report

    # 5. what `rwkvforge eval --run <dpo run> --no-checks` measures: the merged SFT model
    # (base) vs it + the DPO adapter (tuned) on the held-out pairs
    _settings = runs.run_settings(runs.run_config(dpo_dir))
    _ev = evaluate(dpo_dir, merged.output, dpo_dir / "adapter", None,
                   runs.run_data_prefix(runs.run_config(dpo_dir)), None, dpo_dir / "eval",
                   ctx_len=_settings["ctx_len"], micro_bsz=2, log=lambda *a: None,
                   dpo_beta=_settings["dpo_beta"])
    mo.md("## 5. Evaluate\n\n" + render_report(_ev).replace("# Evaluation", "### Evaluation", 1))
    return


if __name__ == "__main__":
    app.run()
