"""Shell entry points: shellcheck-clean, strict mode, and input checks before long work."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").rglob("*.sh")) + [ROOT / ".ci" / "run"]


def test_shellcheck_clean() -> None:
    if not shutil.which("shellcheck"):
        pytest.fail("shellcheck is not installed: scripts/test.sh installs it from Debian's "
                    "packages (apt-get install shellcheck)")
    out = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_strict_mode_and_shebang(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), path
    if path.parent.name != "lib":
        assert "set -euo pipefail" in text, path
        assert path.stat().st_mode & 0o111, f"{path} is not executable"


def test_bootstrap_rejects_unknown_option() -> None:
    out = subprocess.run([str(ROOT / "scripts" / "bootstrap.sh"), "--nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown option '--nope'" in out.stderr


def test_bootstrap_help() -> None:
    out = subprocess.run([str(ROOT / "scripts" / "bootstrap.sh"), "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--with-upstream" in out.stdout


def test_env_get_reads_without_executing(tmp_path: Path) -> None:
    """common.sh's reader never executes values and the environment wins over the file."""
    ws = tmp_path / "configs"
    ws.mkdir()
    marker = tmp_path / "pwned"
    (ws / "workspace.env").write_text(f"SEED=7   # c\nDATA_FILE='$(touch {marker})'\n")
    lib = ROOT / "scripts" / "lib" / "common.sh"
    script = (f'source "{lib}"; ROOT_DIR="{tmp_path}"; printf "%s|%s|%s" '
              '"$(env_get SEED)" "$(env_get DATA_FILE)" "$(env_get LR 0.5)"')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"7|$(touch {marker})|0.5"
    assert not marker.exists()
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "SEED": "9"})
    assert out.stdout.startswith("9|")


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "./scripts/test.sh" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec ./scripts/test.sh" in ci


def test_gitignore_covers_workspace_outputs() -> None:
    ignored = ["runs/x/metrics.jsonl", "models/base/a.pth", "data/raw/a.jsonl",
               "data/processed/a.bin", "logs/a.log", "third_party/RWKV-PEFT/x.py",
               "configs/workspace.env", ".venv/bin/python"]
    kept = ["models/README.md", "configs/workspace.env.example", "data/samples/README.md"]
    out = subprocess.run(["git", "check-ignore", "--no-index", *ignored, *kept],
                         capture_output=True, text=True, cwd=ROOT)
    got = set(out.stdout.split())
    assert set(ignored) <= got
    assert not (set(kept) & got)


def _install_fla(tmp_path: Path, torch_requires: str, triton_installed: str, dev: int) -> str:
    """Run bootstrap.sh's install_fla with a stub python (the torch metadata given) and a stub
    pip that records its arguments; returns the recorded pip call ('' when none)."""
    text = (ROOT / "scripts" / "bootstrap.sh").read_text()
    funcs = "".join(text[text.index(f"\n{name}() {{"):].split("\n}\n", 1)[0] + "\n}\n"
                    for name in ("fla_for_triton", "install_fla"))
    stub = tmp_path / "python"
    stub.write_text("#!/usr/bin/env bash\n"
                    f"case \"$2\" in *requires*) echo '{torch_requires}' ;; "
                    f"*version*) echo '{triton_installed}' ;; esac\n")
    stub.chmod(0o755)
    (tmp_path / "torch-constraints.txt").write_text("torch==2.13.0\n")
    script = (f'set -euo pipefail\ninfo() {{ :; }}\nPY={stub}\nVENV_DIR={tmp_path}\n'
              f'CONSTRAINTS={tmp_path}/torch-constraints.txt\nWITH_DEV={dev}\n'
              f'FLA_DEV_TRITON=$(grep -o "^FLA_DEV_TRITON=\\"[^\\"]*" {ROOT}/scripts/bootstrap.sh | cut -d\\" -f2)\n'
              f'PIP=(echo pip)\n{funcs}\ninstall_fla\n'
              f'[[ -f {tmp_path}/fla-constraints.txt ]] && cat {tmp_path}/fla-constraints.txt || true\n')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_bootstrap_installs_fla_matching_torchs_triton(tmp_path: Path) -> None:
    # a CUDA torch pins its triton: fla-core is chosen for it and triton is held there
    out = _install_fla(tmp_path, "triton==3.7.1", "3.7.1", dev=0)
    assert "fla-core==0.6.0" in out and "triton==3.7.1" in out and "packaging" in out
    assert "torch==2.13.0" in out  # the torch pin stays in the constraints
    # a CPU torch: nothing for a user's runtime environment...
    (tmp_path / "cpu").mkdir()
    assert _install_fla(tmp_path / "cpu", "", "", dev=0) == ""
    # ...and the interpreter-tested pair for --dev (CI)
    (tmp_path / "dev").mkdir()
    out = _install_fla(tmp_path / "dev", "", "", dev=1)
    assert "triton==3.9.0" in out and "fla-core==0.6.0" in out


def _torch_route(cap: str, driver_cuda: str = "") -> tuple[str, str]:
    """bootstrap.sh's torch_route (taken from the script itself): (index, reason)."""
    text = (ROOT / "scripts" / "bootstrap.sh").read_text()
    func = text[text.index("\ntorch_route() {"):].split("\n}\n", 1)[0] + "\n}\n"
    out = subprocess.run(["bash", "-c", f"set -euo pipefail\n{func}\ntorch_route \"$@\"",
                          "route", cap, driver_cuda], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    index, _, reason = out.stdout.partition("\t")
    return index, reason


# torch 2.13.0's CUDA builds (download.pytorch.org, x86_64) and the SASS each carries
TORCH_2_13_BUILDS = {"cu126": {50, 60, 70, 75, 80, 86, 90},
                     "cu129": {75, 80, 86, 90, 100, 120},
                     "cu130": {75, 80, 86, 90, 100, 120},
                     "cu132": {75, 80, 86, 90, 100, 120}}


@pytest.mark.parametrize("cap,driver,want", [
    ("7.5", "12.8", "cu126"),   # RTX 20 / T4
    ("8.6", "13.0", "cu126"),   # RTX 30
    ("8.9", "12.4", "cu126"),   # RTX 40
    ("9.0", "13.0", "cu126"),   # H100
    ("10.0", "13.0", "cu130"),  # B200, a CUDA 13 driver
    ("10.0", "12.8", "cu129"),  # B200, a CUDA 12 driver: cu130 would not load
    ("12.0", "12.8", "cu129"),  # RTX 50 under a 570 Windows driver (WSL2)
    ("12.0", "13.1", "cu130"),
    ("12.0", "", "cu129"),      # driver version unknown: the build any CUDA 12+ driver runs
    ("10.3", "13.0", "cu130"),  # B300: sm_100 SASS runs on 10.3
    ("6.1", "12.2", "cu126"),   # Pascal: only cu126 still has it
    ("3.7", "11.4", "cpu"),     # Kepler: no torch 2.13 build
    ("", "", "cpu"),            # nvidia-smi printed nothing
])
def test_bootstrap_picks_the_torch_build_by_compute_capability(cap: str, driver: str,
                                                               want: str) -> None:
    index, reason = _torch_route(cap, driver)
    assert index == want, reason
    if index != "cpu":
        assert index in TORCH_2_13_BUILDS  # a build that exists for torch 2.13.0 ...
        major, minor = (int(x) for x in cap.split("."))
        have = {a for a in TORCH_2_13_BUILDS[index] if a // 10 == major and a % 10 <= minor}
        assert have, f"{index} has no kernels for sm_{major}{minor}"  # ... with its kernels
    assert "cu128" not in index  # torch 2.13.0 has no cu128 build
