"""A screenshot of a run's curves in a real TensorBoard, taken by headless Chromium (docs/tensorboard.png).

    python benchmarks/tensorboard_screenshot.py RUN_DIR [--out docs/tensorboard.png] [--tags REGEX]

RUN_DIR is a learner's --run-dir from a run with `--report-to tensorboard` (its event files are in
RUN_DIR/tensorboard). The script copies those event files into a scratch log directory under the run's name (so
TensorBoard shows the run by name and no path of this machine), starts `tensorboard` (the package's own server)
on a free loopback port, waits until it serves the run's scalars, opens its Scalars dashboard filtered to
`--tags` in headless Chromium (`apt-get install chromium` on Debian; `--chromium PATH` for another binary), saves
the PNG and stops both. (The Time Series dashboard draws its charts only once they scroll into a real view, so
a headless screenshot of it shows empty cards.) Ends with `RESULT png=... tags=... bytes=...`: the tags shown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_TAGS = "eval/accuracy|train/reward_mean|train/loss|train/kl_k3|train/is_weight_var|train/staleness_mean"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def wait_for_scalars(base: str, server: subprocess.Popen, timeout_s: float) -> list[str]:
    """The scalar tags TensorBoard serves, once it serves any (it loads event files in the background)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"tensorboard exited with code {server.returncode}")
        try:
            runs = get_json(f"{base}/data/plugin/scalars/tags")
            tags = sorted({tag for run in runs.values() for tag in run})
            if tags:
                return tags
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"tensorboard served no scalars within {timeout_s:.0f}s: is RUN_DIR/tensorboard from a run "
                     "with --report-to tensorboard?")


def find_chromium(given: str | None) -> str:
    for name in ([given] if given else ["chromium", "chromium-browser", "google-chrome", "chrome"]):
        found = shutil.which(name) if name else None
        if found:
            return found
    raise SystemExit("no Chromium found: `apt-get install chromium` (Debian) or pass --chromium PATH")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=Path("docs/tensorboard.png"))
    parser.add_argument("--tags", default=DEFAULT_TAGS, help="regular expression of the scalar tags to show")
    parser.add_argument("--window", default="1400,1060", help="browser window WIDTH,HEIGHT in pixels")
    parser.add_argument("--name", default=None, help="the run's name in TensorBoard (default: RUN_DIR's name)")
    parser.add_argument("--render-ms", type=int, default=20000, help="Chromium's virtual time budget for the page")
    parser.add_argument("--chromium", default=None, help="the Chromium binary (default: found on PATH)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="how long TensorBoard may take to load")
    args = parser.parse_args()

    logdir = args.run_dir / "tensorboard"
    if not logdir.is_dir():
        raise SystemExit(f"{logdir} does not exist: run the learner with --report-to tensorboard")
    chromium = find_chromium(args.chromium)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    scratch = Path(tempfile.mkdtemp(prefix="heterorl-tb-"))
    shutil.copytree(logdir, scratch / (args.name or args.run_dir.resolve().name))
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", ".", "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "0"],
        cwd=scratch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        tags = wait_for_scalars(base, server, args.timeout_s)
        shown = [t for t in tags if re.search(args.tags, t)]
        if not shown:
            raise SystemExit(f"no scalar tag matches --tags {args.tags!r}; the run has: {', '.join(tags)}")
        # The Scalars dashboard, light theme, only the chosen tags, no smoothing and no outliers cut: the points
        # as logged.
        state = urllib.parse.urlencode({"tagFilter": args.tags, "_smoothingWeight": "0", "_ignoreYOutliers": "false"},
                                       quote_via=urllib.parse.quote)
        url = f"{base}/?darkMode=false#scalars&{state}"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            shot = subprocess.run(
                [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                 f"--window-size={args.window}", f"--virtual-time-budget={args.render_ms}",
                 f"--screenshot={args.out.resolve()}", url],
                capture_output=True, text=True, timeout=180, env={**os.environ, "LANG": "en_US.UTF-8"})
        if shot.returncode != 0 or not args.out.is_file():
            raise SystemExit(f"chromium failed ({shot.returncode}): {shot.stderr[-2000:]}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{args.out}: TensorBoard at {url}, {len(shown)} of {len(tags)} scalar tags shown")
    print(f"RESULT png={args.out} tags={','.join(shown)} bytes={args.out.stat().st_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
