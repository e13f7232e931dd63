"""Shared by the benchmark scripts: machine facts, versions, and marked sections of docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from importlib import metadata
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "benchmarks.md")
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
DOC_HEADER = """# Benchmarks

Measured on the machine named in each section, in one run per section; EOS is suppressed so every
request yields its full output. The scripts under `benchmarks/` regenerate each marked section
(the rest of this page is kept as is). Raw results go to `benchmarks/results/` (not committed).
"""


def machine() -> dict[str, Any]:
    cpu = "unknown"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "avx512_bf16": "avx512_bf16" in flags,
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def versions(*names: str) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine_line(info: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.1f}" for x in info["loadavg_at_start"])
    return (f"{info['nproc']} CPUs ({info['cpu']}; AVX512-BF16: {'yes' if info['avx512_bf16'] else 'no'}), "
            f"{info['memory_gib']} GiB RAM, Python {info['python']}; load average at start {load}")


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z")


def write_section(name: str, body: str, doc: str = DOC) -> None:
    """Replace (or append) the section between `<!-- NAME:begin -->` and `<!-- NAME:end -->`."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.strip()}\n{end}\n"
    text = DOC_HEADER
    if os.path.exists(doc):
        with open(doc, encoding="utf-8") as f:
            text = f.read()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    os.makedirs(os.path.dirname(doc), exist_ok=True)
    with open(doc, "w", encoding="utf-8") as f:
        f.write(text)


def save_json(stem: str, data: Any) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
    return path


def publish(stem: str, data: Any, text: str, section: str | None) -> None:
    """Save the raw results as JSON, print the report, and write it into the docs' `section`
    (None: leave the docs alone)."""
    path = save_json(stem, data)
    print(text)
    print(f"raw results: {path}")
    if section is not None:
        write_section(section, text)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
