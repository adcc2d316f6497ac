"""The project's pins for an NGC PyTorch image, run while the image is built (docker/Dockerfile).

An NGC image's torch, Triton, Transformer Engine and Apex are built against each other, and its
pip constraint file (``/etc/pip/constraint.txt``, in force through PIP_CONSTRAINT) pins every
package it ships; replacing any of them breaks the others, and a second pin of the same package
makes pip's resolution impossible. So this script

1. checks that the image fits the project: Python >= 3.11 (vLLM's floor; megatron-core 0.16.1
   needs >= 3.10) and the same torch major.minor as requirements.txt's pin (vLLM is compiled
   against the container's torch, and the project is tested on that torch), and stops the build
   with one line otherwise;
2. writes the project's requirements and constraints without torch, Triton and every package the
   container pins, so the container's tested versions stay and the project's pins fill the rest.

usage: python container_requirements.py REQUIREMENTS CONSTRAINTS CONTAINER_CONSTRAINTS OUT_DIR
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Iterable, Optional

# Built into the NGC image from source, whatever its constraint file says.
CONTAINER_BUILT = ("torch", "triton", "pytorch-triton")
MIN_PYTHON = (3, 11)


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> Optional[str]:
    """The distribution a requirement line names (None for blanks, comments and options)."""
    text = line.split("#", 1)[0].strip()
    if not text or text.startswith("-"):
        return None
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", text)
    return normalize(match.group(0)) if match else None


def pinned_version(lines: Iterable[str], name: str) -> Optional[str]:
    """The version `name==V` pins in `lines`, if any."""
    for line in lines:
        if requirement_name(line) == normalize(name):
            match = re.search(r"==\s*([^\s;,#]+)", line)
            if match:
                return match.group(1)
    return None


def keep_lines(lines: Iterable[str], drop: set[str]) -> list[str]:
    """Requirement lines whose distribution is not in `drop` (comments and options kept)."""
    return [line for line in lines if requirement_name(line) not in drop]


def check_image(python: tuple[int, int], container_torch: str, project_torch: str) -> None:
    """Stop (SystemExit, one line) when the image's Python or torch does not fit the project."""
    if python < MIN_PYTHON:
        raise SystemExit(f"container Python {python[0]}.{python[1]} is older than "
                         f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} (vLLM's floor); use a newer NGC PyTorch tag")
    have = container_torch.split("+")[0].split(".")[:2]
    want = project_torch.split(".")[:2]
    if have != want:
        raise SystemExit(f"container torch {container_torch} is not the {'.'.join(want)} line that requirements.txt "
                         f"pins ({project_torch}) and vLLM is built for; choose the NGC tag that ships torch "
                         f"{'.'.join(want)} (BASE_IMAGE)")


def main(argv: list[str]) -> int:
    """Check the image, then write OUT_DIR/requirements.txt and OUT_DIR/constraints.txt."""
    if len(argv) != 4:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    req, cons, container, out = (Path(a) for a in argv)
    req_lines, cons_lines = req.read_text().splitlines(), cons.read_text().splitlines()
    container_lines = container.read_text().splitlines() if container.is_file() else []
    import torch  # the container's

    project_torch = pinned_version(req_lines, "torch")
    if project_torch is None:
        raise SystemExit(f"{req} pins no torch version")
    check_image(sys.version_info[:2], torch.__version__, project_torch)
    drop = {normalize(n) for n in CONTAINER_BUILT} | {n for n in map(requirement_name, container_lines) if n}
    out.mkdir(parents=True, exist_ok=True)
    (out / "requirements.txt").write_text("\n".join(keep_lines(req_lines, drop)) + "\n")
    (out / "constraints.txt").write_text("\n".join(keep_lines(cons_lines, drop)) + "\n")
    kept = [n for n in map(requirement_name, req_lines) if n and n not in drop]
    print(f"container torch {torch.__version__}; project pins installed: {', '.join(kept)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
