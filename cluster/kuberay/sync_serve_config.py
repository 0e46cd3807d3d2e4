"""Copy serving/serve_config.yaml into rayservice.yaml's serveConfigV2, verbatim (comments included).

    python cluster/kuberay/sync_serve_config.py          # rewrite rayservice.yaml
    python cluster/kuberay/sync_serve_config.py --check  # exit 1 if they differ

tests/test_cluster_manifests.py fails when the two drift apart.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "serving" / "serve_config.yaml"
RAYSERVICE = Path(__file__).resolve().parent / "rayservice.yaml"
BLOCK = re.compile(r"^(?P<indent> *)serveConfigV2: \|[-+]?\n(?P<body>(?:(?P=indent)  .*\n|[ \t]*\n)*)", re.M)


def synced(manifest: str, serve_config: str) -> str:
    m = BLOCK.search(manifest)
    if m is None:
        raise SystemExit(f"{RAYSERVICE}: no `serveConfigV2: |` block found")
    pad = m.group("indent") + "  "
    body = "".join(pad + line if line.strip() else "\n" for line in serve_config.rstrip("\n").splitlines(True))
    return manifest[: m.start()] + f"{m.group('indent')}serveConfigV2: |\n{body.rstrip(chr(10))}\n" + manifest[m.end():]


def main() -> int:
    old = RAYSERVICE.read_text()
    new = synced(old, SERVE_CONFIG.read_text())
    if "--check" in sys.argv[1:]:
        print("in sync" if new == old else f"{RAYSERVICE.name} differs from {SERVE_CONFIG}")
        return 0 if new == old else 1
    RAYSERVICE.write_text(new)
    print(f"{RAYSERVICE} updated from {SERVE_CONFIG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
