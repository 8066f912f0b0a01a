"""Start the bilingual dashboard (Streamlit) on 127.0.0.1.

    ./scripts/dashboard.sh                    # = rwkvforge dashboard
    python -m rwkvforge.dashboard.launch --port 8502
    python -m rwkvforge.dashboard.launch --print-command

Runs `streamlit run app.py --server.address 127.0.0.1 --server.port DASHBOARD_PORT
--server.headless true` as a child process (an argv list, no shell). The port comes from
--port, else DASHBOARD_PORT of the resolved settings (configs/workspace.env, environment).
The app reads run folders of the workspace (RWKVFORGE_ROOT) and never writes them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from rwkvforge.paths import workspace_root

APP = Path(__file__).resolve().parent / "app.py"
LOCAL_ADDRESSES = ("127.0.0.1", "localhost", "::1")


def build_command(port: int, address: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.address", address, "--server.port", str(port),
            "--server.headless", "true",
            "--browser.gatherUsageStats", "false",  # no telemetry: the dashboard stays local
            "--client.toolbarMode", "viewer"]  # no "Deploy" / developer menu (untranslated)


def default_port() -> int:
    from rwkvforge.config import ConfigError, resolve

    try:
        return int(resolve().settings.dashboard_port)
    except ConfigError as e:
        print(f"dashboard: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rwkvforge dashboard",
                                 description="Bilingual (English / 中文) web dashboard: runs, "
                                 "compare, data, chat, system. Read-only.")
    ap.add_argument("--port", "--dashboard-port", dest="port", type=int, default=None,
                    help="port (default: DASHBOARD_PORT from configs/workspace.env, 8501)")
    ap.add_argument("--address", default="127.0.0.1",
                    help="bind address (default 127.0.0.1; anything else exposes your runs "
                         "and models to the network)")
    ap.add_argument("--print-command", action="store_true",
                    help="print the streamlit command instead of running it")
    args = ap.parse_args(argv)
    port = args.port if args.port is not None else default_port()
    if not 1 <= port <= 65535:
        print(f"dashboard: --port {port} is not a TCP port (1-65535).", file=sys.stderr)
        return 2
    cmd = build_command(port, args.address)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    if args.address not in LOCAL_ADDRESSES:
        print(f"dashboard: warning: binding {args.address} makes the dashboard reachable "
              "from other machines; it has no login.", file=sys.stderr)
    root = workspace_root()
    env = dict(os.environ, RWKVFORGE_ROOT=str(root))
    print(f"dashboard: workspace {root}; open http://{args.address}:{port}", file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env)

    def stop(_signum, _frame) -> None:  # SIGTERM / SIGHUP: take the server down with us
        proc.terminate()

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the server too (same process group)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
