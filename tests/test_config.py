"""Settings: every shipped .env validates, precedence order, and clear errors for bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rwkvforge import config
from rwkvforge.config import ConfigError, Settings, load_env_file, parse_env_text, resolve

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.env")) + [ROOT / "configs" / "workspace.env.example"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_env_validates(path: Path) -> None:
    values = load_env_file(path)
    assert values, f"{path} holds no settings"
    for key, (_, where) in values.items():
        assert key.lower() in Settings.__dataclass_fields__
        assert where.startswith(str(path))


def test_required_model_and_profile_files_exist() -> None:
    models = {p.stem for p in (ROOT / "configs" / "model").glob("*.env")}
    assert {"rwkv7-tiny", "rwkv7-0.1b", "rwkv7-0.4b", "rwkv7-1.5b", "rwkv7-2.9b",
            "rwkv7-7.2b"} <= models
    profiles = {p.stem for p in (ROOT / "configs" / "profile").glob("*.env")}
    assert {"lora-bf16", "qlora-nf4", "qlora-int8"} <= profiles


def test_every_knob_has_a_comment() -> None:
    for path in SHIPPED:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip() and not line.lstrip().startswith("#"):
                above = lines[i - 1].lstrip().startswith("#") if i else False
                assert "#" in line or above, f"{path}:{i + 1} has no trade-off comment"


def _workspace(tmp_path: Path) -> Path:
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "profile").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "configs" / "workspace.env").write_text("CTX_LEN=100\nLR=0.1\nSEED=1\nLORA_R=4\n")
    (tmp_path / "configs" / "model" / "m.env").write_text("CTX_LEN=200\nLR=0.2\nSEED=2\n")
    (tmp_path / "configs" / "profile" / "p.env").write_text("CTX_LEN=300\nLR=0.3\n")
    return tmp_path


def test_precedence_workspace_model_profile_env_cli(tmp_path: Path) -> None:
    root = _workspace(tmp_path)
    res = resolve(model="m", profile="p", env={"CTX_LEN": "400"}, cli={"ctx_len": 500},
                  root=root)
    s = res.settings
    assert s.ctx_len == 500 and res.sources["CTX_LEN"] == "cli"
    res = resolve(model="m", profile="p", env={"CTX_LEN": "400"}, root=root)
    assert res.settings.ctx_len == 400 and res.sources["CTX_LEN"] == "env"
    assert res.settings.lr == 0.3 and res.sources["LR"].endswith("p.env:2")
    assert res.settings.seed == 2 and res.sources["SEED"].endswith("m.env:3")
    assert res.settings.lora_r == 4 and res.sources["LORA_R"].endswith("workspace.env:4")
    assert res.sources["MICRO_BSZ"] == "default"
    assert res.settings.micro_bsz == Settings().micro_bsz


def test_unknown_key_suggests(tmp_path: Path) -> None:
    p = tmp_path / "x.env"
    p.write_text("# comment\nCTX_LENN=5\n")
    with pytest.raises(ConfigError) as e:
        load_env_file(p)
    msg = str(e.value)
    assert f"{p}:2" in msg and "CTX_LENN" in msg and "Did you mean CTX_LEN?" in msg


@pytest.mark.parametrize("line,needle", [
    ("LR=$(rm -rf /)", "shell syntax"),
    ("LR=`id`", "shell syntax"),
    ("BASE_MODEL=$HOME/x.pth", "shell syntax"),
    ("BASE_MODEL=a b", "unquoted space"),
    ("export LR=1", "export"),
    ("lr=1", "bad key"),
    ("LR = 1", "bad key"),
    ("LR", "expected KEY=value"),
    ('BASE_MODEL="abc', "unbalanced quotes"),
    ("SEED=1; echo", "shell syntax"),
])
def test_shell_syntax_is_an_error_with_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    p = tmp_path / "bad.env"
    p.write_text(f"SEED=1\n{line}\n")
    with pytest.raises(ConfigError) as e:
        load_env_file(p)
    assert f"{p}:2" in str(e.value)
    assert needle in str(e.value)


@pytest.mark.parametrize("line,needle", [
    ("CTX_LEN=abc", "not a valid int"),
    ("CTX_LEN=4", "below the minimum"),
    ("QUANT=nf5", "not one of"),
    ("USE_DORA=maybe", "not a valid bool"),
    ("LR=fast", "not a valid float"),
    ("LR=nan", "must be a finite number"),
    ("LORA_ALPHA=inf", "must be a finite number"),
])
def test_bad_values(tmp_path: Path, line: str, needle: str) -> None:
    p = tmp_path / "bad.env"
    p.write_text(line + "\n")
    with pytest.raises(ConfigError) as e:
        load_env_file(p)
    assert needle in str(e.value) and f"{p}:1" in str(e.value)


def test_quant_typo_suggests_choice(tmp_path: Path) -> None:
    p = tmp_path / "bad.env"
    p.write_text("QUANT=nf5\n")
    with pytest.raises(ConfigError, match="Did you mean nf4"):
        load_env_file(p)


def test_comments_and_quotes_are_literal() -> None:
    vals = parse_env_text("A_B='x $y' # c\nC=\"p q\"\nD=plain   # trailing\nE=\n", "t.env")
    assert vals["A_B"][0] == "x $y"
    assert vals["C"][0] == "p q"
    assert vals["D"][0] == "plain"
    assert vals["E"][0] == ""


def test_duplicate_key_is_error() -> None:
    with pytest.raises(ConfigError, match="repeated"):
        parse_env_text("LR=1\nLR=2\n", "t.env")


def test_bad_env_var_names_the_variable(tmp_path: Path) -> None:
    root = _workspace(tmp_path)
    with pytest.raises(ConfigError, match="environment variable MICRO_BSZ"):
        resolve(env={"MICRO_BSZ": "zero"}, root=root)


def test_unknown_profile_lists_available(tmp_path: Path) -> None:
    root = _workspace(tmp_path)
    with pytest.raises(ConfigError, match="Available: p"):
        resolve(profile="qlora", root=root)


def test_own_profile_files(tmp_path: Path) -> None:
    """A profile .env of one's own: a BOM (Windows Notepad) is fine, its file name labels the
    runs when it sets no PROFILE, and a path that does not exist is named."""
    root = _workspace(tmp_path)
    mine = tmp_path / "my-nf4.env"
    mine.write_bytes(b"\xef\xbb\xbfQUANT=nf4\nLORA_R=8\n")
    res = resolve(profile=str(mine), env={}, root=root)
    assert (res.settings.quant, res.settings.lora_r, res.settings.profile) == ("nf4", 8, "my-nf4")
    with pytest.raises(ConfigError, match=f"profile file {tmp_path / 'nope.env'} not found"):
        resolve(profile=str(tmp_path / "nope.env"), env={}, root=root)


def test_config_show_resolves_like_train_for_the_demo_model() -> None:
    """With no BASE_MODEL, train adds configs/model/rwkv7-tiny.env; config show says so."""
    env = {k: v for k, v in __import__("os").environ.items()
           if k.upper() not in config.FIELD_BY_KEY and not k.startswith("RWKVFORGE_")}
    out = subprocess.run([sys.executable, "-m", "rwkvforge", "config", "show", "--json",
                          "--profile", "lora-bf16"], capture_output=True, text=True, cwd=ROOT,
                         env={**env, "RWKVFORGE_ROOT": str(ROOT)})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    tiny = load_env_file(ROOT / "configs" / "model" / "rwkv7-tiny.env")
    assert data["settings"]["lr"] == tiny["LR"][0]
    assert data["sources"]["LR"].startswith(str(ROOT / "configs" / "model" / "rwkv7-tiny.env"))


def test_shipped_envs_are_valid_bash(tmp_path: Path) -> None:
    """Bash may `source` the files: sourcing each must succeed and give the same values."""
    for path in SHIPPED:
        out = subprocess.run(["bash", "-c", 'set -eu; source "$1"; env', "_", str(path)],
                             capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, (path, out.stderr)
        parsed = parse_env_text(path.read_text(), str(path))
        env_lines = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        for key, (val, _) in parsed.items():
            # sourced without export: not in env; check via printf instead
            got = subprocess.run(["bash", "-c", f'source "$1"; printf %s "${{{key}}}"', "_",
                                  str(path)], capture_output=True, text=True).stdout
            assert got == val, (path, key, got, val)
        assert env_lines is not None


def test_cli_config_show_json_and_flags() -> None:
    out = subprocess.run([sys.executable, "-m", "rwkvforge", "config", "show", "--json",
                          "--profile", "qlora-nf4", "--ctx-len", "777"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["settings"]["ctx_len"] == 777 and data["sources"]["CTX_LEN"] == "cli"
    assert data["settings"]["quant"] == "nf4"
    assert data["sources"]["QUANT"].endswith("qlora-nf4.env:" + data["sources"]["QUANT"].split(":")[-1])


def test_cli_config_show_bad_flag_value_is_clear() -> None:
    out = subprocess.run([sys.executable, "-m", "rwkvforge", "config", "show", "--quant", "nf5"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert "--quant" in out.stderr and "Did you mean nf4" in out.stderr


def test_settings_schema_documents_every_field() -> None:
    for f in config.fields(Settings):
        assert f.metadata.get("help"), f"{f.name} has no help text"


@pytest.mark.parametrize("lang,name", [("en", "configuration.md"),
                                       ("zh-CN", "configuration.zh-CN.md")])
def test_configuration_reference_is_fresh(lang: str, name: str) -> None:
    page = (ROOT / "docs" / name).read_text(encoding="utf-8")
    assert page == config.reference_markdown(lang), (
        f"docs/{name} is stale: run `rwkvforge config docs`")
    for f in config.fields(Settings):
        assert f"`{f.name.upper()}`" in page


def test_non_ascii_serve_api_key_is_refused_at_start() -> None:
    """A key with characters HTTP clients cannot send in a header could never authenticate
    (every request got 401): it is refused when the settings are read, without echoing it."""
    for bad in ("pässwörd-123", "密钥密钥密钥", "two words"):
        with pytest.raises(ConfigError, match="printable ASCII") as ei:
            resolve(env={"SERVE_API_KEY": bad}, root=ROOT)
        assert bad not in str(ei.value)
    assert resolve(env={"SERVE_API_KEY": "sk-A1b2_c3.D4"}, root=ROOT).settings.serve_api_key \
        == "sk-A1b2_c3.D4"


@pytest.mark.skipif(sys.platform == "win32", reason="named pipes and SIGINT are POSIX here")
def test_ctrl_c_in_a_command_ends_with_one_line_not_a_traceback(tmp_path):
    """Ctrl-C in `rwkvforge merge` (and every command that does not handle it, as train does)
    printed a KeyboardInterrupt traceback. Made deterministic: `config check` blocks reading
    a named pipe among the .env files, and SIGINT arrives while it waits."""
    import os
    import signal
    import time

    (tmp_path / "configs" / "profile").mkdir(parents=True)
    fifo = tmp_path / "configs" / "profile" / "slow.env"
    os.mkfifo(fifo)
    # (SIGINT back to its default in the child: a test run started as a background job of a
    # non-interactive shell inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: the command would hang, as a user's terminal never makes it)
    p = subprocess.Popen([sys.executable, "-m", "rwkvforge.cli", "config", "check"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "RWKVFORGE_ROOT": str(tmp_path)},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def writer() -> int | None:  # opens only once the command is waiting on the pipe
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return None

    fd, t0 = None, time.monotonic()
    while fd is None and p.poll() is None and time.monotonic() - t0 < 60:
        fd = writer()
        time.sleep(0.05)
    assert fd is not None, p.communicate()
    try:
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        os.close(fd)
    assert p.returncode == 130, err
    assert "rwkvforge config: interrupted (Ctrl-C)" in err and "Traceback" not in err
