"""The CUDA code not yet run on a GPU: ``python -m benchmarks.gpu_changes``.

The commit the CUDA code last ran at on a GPU comes from the committed GPU results: the
``commit: <hash>`` lines that ``benchmarks/gpu_runbook.sh`` writes into its summary (committed as
``benchmarks/results/<gpu-name>/runbook-summary.txt``) and a ``commit`` key in a results.json's
``meta``, if any. The newest of them is the baseline; the files under ``csrc/cuda`` and
``csrc/common`` (the device code and the host/device code it includes) that differ from it in this
checkout, and the commits that touched them, are what the next GPU run checks for the first time.

The runbook prints this first. A machine without git or without this repository's history (a
copied work tree, a shallow clone) gets a sentence saying what is missing instead of a list; the
exit status is 0 either way, so the runbook goes on.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE_CODE = ["csrc/cuda", "csrc/common"]
COMMIT_LINE = re.compile(r"^(?:#\s*)?commit:\s*([0-9a-f]{7,40})\b", re.MULTILINE)


def recorded_commits(results: Path) -> list[tuple[str, Path]]:
    """(commit, file) for every commit the committed GPU results record, in file order."""
    found: list[tuple[str, Path]] = []
    for folder in sorted(results.glob("nvidia-*")):
        for name in ("runbook-summary.txt", "summary.txt"):
            path = folder / name
            if path.is_file():
                found += [(c, path) for c in COMMIT_LINE.findall(path.read_text(errors="replace"))]
        path = folder / "results.json"
        if path.is_file():
            commit = json.loads(path.read_text()).get("meta", {}).get("commit")
            if isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{7,40}", commit):
                found.append((commit, path))
    return found


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)


def has_history() -> str | None:
    """None when git and this repository's history are here, else why not."""
    if shutil.which("git") is None:
        return "git is not installed here"
    if git("rev-parse", "--verify", "-q", "HEAD").returncode != 0:
        return "this copy has no git history"
    return None


def newest(commits: list[str]) -> str:
    """The commit that all the others are ancestors of, if one is; else the one with the latest commit time."""
    for c in commits:
        if all(git("merge-base", "--is-ancestor", o, c).returncode == 0 for o in commits):
            return c
    return max(commits, key=lambda c: int(git("show", "-s", "--format=%ct", c).stdout.strip() or 0))


def report(results: Path = ROOT / "benchmarks" / "results") -> list[str]:
    recorded = recorded_commits(results)
    if not recorded:
        where = results.relative_to(ROOT)
        message = (
            f"no GPU run recorded: no 'commit: <hash>' line under {where}/nvidia-*/ (the runbook writes one "
            "into its summary.txt); every CUDA file is unverified on a GPU"
        )
        return [message]
    why = has_history()
    if why is not None:
        latest, path = recorded[-1]
        message = (
            f"last GPU run recorded at {latest} ({path.relative_to(ROOT)}), but {why}: cannot list the "
            f"{' and '.join(DEVICE_CODE)} changes since; run `python -m benchmarks.gpu_changes` in a clone"
        )
        return [message]
    known = [c for c, _ in recorded if git("cat-file", "-e", f"{c}^{{commit}}").returncode == 0]
    if not known:
        message = (
            f"the recorded GPU commits ({', '.join(sorted({c for c, _ in recorded}))}) are not in this "
            "history (a shallow clone?): cannot list the changes since"
        )
        return [message]
    base = newest(known)
    short = git("rev-parse", "--short", base).stdout.strip()
    changed = git("diff", "--name-only", base, "--", *DEVICE_CODE).stdout.split()
    changed += git("ls-files", "--others", "--exclude-standard", "--", *DEVICE_CODE).stdout.split()
    if not changed:
        return [f"{' and '.join(DEVICE_CODE)}: unchanged since the last GPU run ({short}); nothing new to verify"]
    lines = [f"not yet run on a GPU: {len(changed)} file(s) under {' and '.join(DEVICE_CODE)} differ from {short}"]
    lines += [f"  {name}" for name in sorted(set(changed))]
    log = git("log", "--format=%h %s", f"{base}..HEAD", "--", *DEVICE_CODE).stdout.splitlines()
    if log:
        lines.append(f"commits since {short} that touch them ({len(log)}):")
        lines += [f"  {entry[:110]}" + ("..." if len(entry) > 110 else "") for entry in log]
    if git("status", "--porcelain", "--", *DEVICE_CODE).stdout.strip():
        lines.append("  (and uncommitted changes in the work tree)")
    return lines


def main() -> int:
    print("\n".join(report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
