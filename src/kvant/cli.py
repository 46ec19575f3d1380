"""The ``kvant`` command: cluster, index, search, bench, demo, info.

Exit codes: 0 ok, 1 runtime error, 2 bad usage or input. ``--json`` prints one JSON document on
stdout; ``--quiet`` (or a non-TTY stderr) turns progress bars off.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import numpy as np

from .errors import InvalidInput, KvantError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

# Each section below defines its subcommands and appends an ``add(subparsers)`` function here.
_ADDERS: list[Callable] = []


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 itself; raise so main() owns every exit path
        raise _UsageError(f"{self.prog}: {message}")


def progress_enabled(args) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def progress(args, total: int | None = None, desc: str = ""):
    """A tqdm bar on stderr, disabled when quiet or not a TTY."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not progress_enabled(args), file=sys.stderr, leave=False)


def emit(args, payload: dict, text: str | None = None) -> None:
    """Print ``payload`` as JSON with --json, else ``text`` (or a key: value listing)."""
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, default=_json_default))
    elif text is not None:
        print(text)
    else:
        for key, value in payload.items():
            print(f"{key}: {value}")


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="threads for kernels and BLAS (default: all)")


# ----------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------


def _cmd_info(args) -> int:
    import platform

    import numba
    import pyarrow

    from . import __version__
    from ._config import get_num_threads

    try:
        from numba.misc.numba_sysinfo import get_sysinfo

        simd = get_sysinfo().get("CPU Features", "")
        cpu_name = get_sysinfo().get("CPU Name", "")
    except Exception:  # sysinfo layout varies across numba releases
        simd, cpu_name = "", ""
    flags = set(str(simd).split())
    level = next((lv for lv in ("avx512f", "avx2", "avx", "sse4.2", "neon") if lv in flags), "baseline")
    payload = {
        "kvant": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "pyarrow": pyarrow.__version__,
        "threads": get_num_threads(),
        "cpu": cpu_name,
        "simd_level": level,
        "simd_features": sorted(f for f in flags if f.startswith(("avx", "sse", "fma", "f16c", "neon"))),
    }
    emit(args, payload)
    return EXIT_OK


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, threads and the SIMD level Numba sees")
    _common(p)
    p.set_defaults(func=_cmd_info)


_ADDERS.append(_add_info)


# --- cluster + demo (issue 2) ---
# --- index + search + bench kernels (issue 3) ---
# --- tree (issue 4) ---


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvant", description="Cluster, compress and search embedding vectors.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"kvant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in _ADDERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    try:
        if getattr(args, "threads", None) is not None:
            from ._config import set_num_threads

            set_num_threads(args.threads)
        return int(args.func(args) or 0)
    except InvalidInput as exc:
        print(f"kvant: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KvantError as exc:
        print(f"kvant: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
