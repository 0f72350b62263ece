"""Sizes on command lines and in reports, in binary units as nccl-tests reads and prints them."""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'1K' -> 1024; also '64M', '1G', '1.5M', '.5G', '4096', '16MiB', '4KB' (an argparse type)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 1024, 1K, 64M, 1G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: float) -> str:
    """1073741824 -> '1G'; a size that is no whole multiple of a unit stays in bytes."""
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]:.0f}{unit}"
    return f"{n:.0f}"
