"""upstream.py: the RWKV-PEFT command mapped from the settings, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rwkvforge import config as cfgmod
from rwkvforge import train as T
from rwkvforge import upstream as U

ROOT = Path(__file__).resolve().parents[1]


def test_rwkv_peft_command_maps_the_config(tmp_path):
    from rwkvforge.model.rwkv7 import RWKV7Config

    s = cfgmod.resolve(profile="qlora-nf4", cli={"lora_r": 16, "lora_alpha": 32, "ctx_len": 1024,
                                                  "micro_bsz": 4, "grad_accum": 2, "lr": 2e-4,
                                                  "grad_cp": True, "train_parts": "ln,time",
                                                  "deepspeed_stage": 2, "num_gpus": 2},
                       env={}, root=ROOT).settings
    cfg = RWKV7Config.suggested(24, 2048)
    argv = U.rwkv_peft_command(s, Path("/m/rwkv.pth"), Path("/d/bsl"), cfg, Path("/o"),
                               Path("/tp/RWKV-PEFT"), python="python")
    assert argv[:2] == ["python", "/tp/RWKV-PEFT/train.py"]
    opt = {argv[i]: argv[i + 1] for i in range(2, len(argv) - 1) if argv[i].startswith("--")}
    assert opt["--load_model"] == "/m/rwkv.pth" and opt["--data_file"] == "/d/bsl"
    assert opt["--n_layer"] == "24" and opt["--n_embd"] == "2048"
    assert opt["--vocab_size"] == "65536" and opt["--my_testing"] == "x070"
    assert opt["--ctx_len"] == "1024" and opt["--micro_bsz"] == "4"
    assert opt["--accumulate_grad_batches"] == "2" and opt["--devices"] == "2"
    assert opt["--quant"] == "nf4" and opt["--precision"] == "bf16"
    assert opt["--strategy"] == "deepspeed_stage_2" and opt["--grad_cp"] == "1"
    assert opt["--peft"] == "lora" and float(opt["--lr_init"]) == 2e-4
    assert json.loads(opt["--lora_config"]) == {"lora_load": "", "lora_r": 16,
                                                "lora_alpha": 32.0, "lora_dropout": 0.0}
    i = argv.index("--train_parts")
    assert argv[i + 1:i + 3] == ["ln", "time"]
    pissa = cfgmod.resolve(cli={"peft_init": "pissa", "lora_r": 8}, env={}, root=ROOT).settings
    argv = U.rwkv_peft_command(pissa, Path("/m"), Path("/d"), cfg, Path("/o"), Path("/tp"))
    assert argv[argv.index("--peft") + 1] == "pissa"
    assert json.loads(argv[argv.index("--pissa_config") + 1])["pissa_r"] == 8
    assert U.rwkv_peft_unmapped(s) == []
    other = cfgmod.resolve(cli={"optimizer": "adamw8bit", "lora_targets": "att.key",
                                "grad_clip": 0.5}, env={}, root=ROOT).settings
    assert U.rwkv_peft_unmapped(other) == ["LORA_TARGETS=att.key", "OPTIMIZER=adamw8bit",
                                           "GRAD_CLIP=0.5"]
    dora = cfgmod.resolve(cli={"use_dora": True}, env={}, root=ROOT).settings
    with pytest.raises(U.UpstreamError, match="USE_DORA=1 has no RWKV-PEFT"):
        U.rwkv_peft_command(dora, Path("/m"), Path("/d"), cfg, Path("/o"), Path("/tp"))


def test_rwkv_peft_missing_checkout_is_a_clear_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setenv("RWKVFORGE_ROOT", str(tmp_path))
    assert T.main(["--trainer", "rwkv-peft", "--print-command"]) == 2
    err = capsys.readouterr().err
    assert "third_party/RWKV-PEFT/train.py is missing" in err and "--with-upstream" in err
