# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "rwkvforge",
#     "marimo",
# ]
# ///
"""SFT walkthrough: prepare -> train -> eval -> chat on the embedded demo model, through the
rwkvforge package's public API (the same functions the `rwkvforge` commands call).

    marimo edit notebooks/sft_walkthrough.py     # interactive
    python notebooks/sft_walkthrough.py          # headless: runs every cell, fails on error

Outputs go to the workspace (RWKVFORGE_ROOT, else this checkout): data/processed/ and
runs/sft-walkthrough-<time>/. Small settings: a few minutes on 2 CPU cores.

Model and data come from the same settings as `rwkvforge train`: BASE_MODEL and DATA_FILE (or
DATA_PREFIX) in configs/workspace.env or the environment; unset, the demo model and the shipped
sample. marimo comes with `./scripts/bootstrap.sh` (the `notebooks` extra); in another
environment: `pip install "marimo>=0.9"`.
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
        # SFT walkthrough: prepare → train → eval → chat

        This notebook fine-tunes the **embedded demo model** (real RWKV-7 architecture and World
        vocabulary, random weights) on the shipped 1C:Enterprise chat samples with LoRA, then
        measures it and talks to it. Every step calls the `rwkvforge` package, exactly as the
        `rwkvforge prepare / train / eval / infer` commands do. Your own model and data: set
        `BASE_MODEL` and `DATA_FILE` in `configs/workspace.env` (or the environment), as for
        `rwkvforge train`, and run the notebook again (see `docs/quickstart.md`).

        marimo missing? `./scripts/bootstrap.sh` installs it (the `notebooks` extra), or
        `pip install "marimo>=0.9"` in your environment.
        """
    )
    return


@app.cell
def _():
    import datetime
    import json
    import math

    import torch

    from rwkvforge import config, paths

    root = paths.workspace_root()
    # Your BASE_MODEL / DATA_FILE (workspace.env, environment) as `rwkvforge train` reads
    # them; without a BASE_MODEL the demo model's layer (configs/model/rwkv7-tiny.env).
    # Small on purpose: runs in minutes on a laptop CPU. For a real run use a profile that
    # fits your card and hundreds of steps.
    own_model = bool(config.resolve(root=root).settings.base_model)
    run_name = "sft-walkthrough-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    resolved = config.resolve(
        model=None if own_model else "rwkv7-tiny",
        profile="lora-bf16",
        cli={
            "precision": "fp32" if not torch.cuda.is_available() else "bf16",
            "ctx_len": 128,
            "micro_bsz": 2,
            "max_steps": 8,
            "warmup_steps": 2,
            "save_every": 4,
            "lr": 1e-3,
            "run_name": run_name,
        },
        root=root,
    )
    s = resolved.settings
    run_dir = root / s.runs_dir / run_name
    return json, math, resolved, root, run_dir, s


@app.cell
def _(mo, resolved, root):
    _keys = ["BASE_MODEL", "DATA_FILE", "DATA_TYPE", "PROFILE", "QUANT", "PRECISION",
             "LORA_R", "CTX_LEN", "MICRO_BSZ", "MAX_STEPS", "LR"]
    _rows = [f"| `{k}` | `{getattr(resolved.settings, k.lower())!r}` | {resolved.sources[k]} |"
             for k in _keys]
    mo.md("\n".join([
        "## 1. Settings", "",
        f"Workspace: `{root}`. Each value and the layer it came from (workspace.env < model < "
        "profile < environment < flags; here the notebook plays the part of the flags):", "",
        "| key | value | from |", "|---|---|---|", *_rows,
    ]))
    return


@app.cell
def _(json, resolved, root, s):
    from rwkvforge.data.prepare import prepared_data

    # DATA_FILE / DATA_PREFIX from the settings (the shipped sample when unset), prepared as
    # `rwkvforge train` prepares it: data/processed/<name of the file>, again when it changed
    prefix, data_file = prepared_data(s, resolved.sources, root, say=lambda *a: None)
    with open(f"{prefix}.meta.json", encoding="utf-8") as _f:
        meta = json.load(_f)
    return data_file, meta, prefix


@app.cell
def _(data_file, meta, mo, prefix):
    _tr, _va = meta["splits"]["train"], meta["splits"]["val"]
    mo.md(
        f"""
        ## 2. Prepare

        `{data_file or prefix}` → `{prefix}` (`rwkvforge prepare` does the same). Every line
        was validated; in chat data the prompt is masked out of the loss, only assistant text
        is trained.

        - accepted: **{meta["documents"]}** examples, rejected: {meta["rejected"]}
        - train: {_tr["documents"]} examples, {_tr["tokens"]} tokens;
          validation: {_va["documents"] if _va else 0} examples
        - steps per epoch at this batch size: {meta.get("steps_per_epoch")}
        """
    )
    return


@app.cell
def _(mo, prefix):
    from rwkvforge.data.loader import open_split
    from rwkvforge.tokenizer import get_tokenizer

    tok = get_tokenizer()
    # the first training example as the trainer reads it: token ids and their loss mask
    _split = open_split(prefix, "train")
    _ids, _mask = (a.tolist() for a in _split.item(0, 4096))
    _prompt = tok.decode([t for t, m in zip(_ids, _mask) if not m and t])
    _trained = tok.decode([t for t, m in zip(_ids, _mask) if m and t])
    mo.md(
        f"""
        The first training example as the trainer reads it: {len(_ids)} tokens, {sum(_mask)}
        of them trained.

        **not trained (prompt):**
        ```
        {_prompt}
        ```
        **trained (answer + end of turn):**
        ```
        {_trained}
        ```
        """
    )
    return (tok,)


@app.cell
def _(mo, resolved, root, run_dir):
    from rwkvforge.train import Trainer

    trainer = Trainer(resolved, run_dir, root=root, progress=False)
    result = trainer.run()
    mo.md(f"## 3. Train\n\nRun folder: `{run_dir}` (adapter, checkpoints, metrics, loss.png).")
    return result, trainer


@app.cell
def _(json, mo, result, run_dir):
    _rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    _table = [f"| {r['step']} | {r['loss']:.4f} | {r['lr']:.2e} | {r['tokens_per_s']:.0f} |"
              for r in _rows]
    assert result.step == len(_rows) and (run_dir / "adapter" / "adapter_config.json").is_file()
    mo.md("\n".join(["| step | loss | lr | tokens/s |", "|---|---|---|---|", *_table]))
    return


@app.cell
def _(math, mo, prefix, result, run_dir, s, trainer):
    from rwkvforge import runs
    from rwkvforge.evaluate import default_checks, evaluate, render_report

    # what `rwkvforge eval --run <run>` does: base vs tuned (adapter merged in memory) on the
    # validation split, plus the default prompt checks (your held-out examples; the shipped
    # 1C checks for the sample data) answered greedily by both models
    _record = runs.run_config(run_dir)
    _checks, _which = default_checks(_record, prefix)
    evaluation = evaluate(run_dir, trainer.inputs.model_path, run_dir / "adapter", None, prefix,
                          _checks, run_dir / "eval", ctx_len=s.ctx_len, micro_bsz=2,
                          max_tokens=16, log=lambda *a: None, checks_source=_which)
    assert (run_dir / "eval" / "report.md").is_file()
    _lb, _la = result.val_loss_start, result.val_loss_end
    mo.md("\n".join([
        "## 4. Evaluate", "",
        f"The trainer's own validation loss: {_lb:.4f} before training (perplexity "
        f"{math.exp(_lb):,.1f}), {_la:.4f} after (perplexity {math.exp(_la):,.1f}).", "",
        "`rwkvforge.evaluate` (the `rwkvforge eval` command) writes this report to "
        f"`{run_dir / 'eval' / 'report.md'}`. Prompt checks: {_which}.", "",
        render_report(evaluation).replace("# Evaluation", "### Evaluation", 1),
    ]))
    return


@app.cell
def _(mo, run_dir, tok, trainer):
    import torch as _torch

    from rwkvforge.generate import chat_params, chat_turn, encode_chat_prompt
    from rwkvforge.infer import BuiltinRunner
    from rwkvforge.runs import chat_prompt, run_config

    # base + adapter merged in memory, as `rwkvforge infer --adapter runs/<run>/adapter` does
    runner = BuiltinRunner(trainer.inputs.model_path, tok, _torch.float32, "cpu",
                           adapter=str(run_dir / "adapter"))
    # a question of the data used: its first held-out one (the 1C question for the sample)
    _mode, _question = chat_prompt(run_config(run_dir))
    if _mode == "chat":
        _ids, _ends = encode_chat_prompt(chat_turn(_question), tok)
    else:  # text data: the start of a held-out document, continued as plain text
        _ids, _ends = tok.encode(_question), ()
    _pieces = []
    _answer, _finish, _n = runner.generate(  # the chat defaults of infer / serve / dashboard
        _ids, chat_params(max_tokens=40, seed=0), _pieces.append, cache_at=_ends)
    mo.md(
        f"""
        ## 5. Chat

        **User:** {_question}

        **Assistant** ({_n} tokens, finish: {_finish}):
        ```
        {"".join(_pieces)}
        ```
        The demo model started from random weights, so this is not a good answer yet: with a real
        base model (`BASE_MODEL`) the same steps give a useful assistant.
        """
    )
    return


if __name__ == "__main__":
    app.run()
