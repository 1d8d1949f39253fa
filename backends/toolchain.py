"""External tools the cross targets need, found on PATH or named with the Debian package that
provides them. Every backend asks here, so a missing tool fails the same way everywhere."""

from __future__ import annotations

import shutil

from qcompiler.errors import LoweringError

# tool -> Debian package that installs it (`make setup` installs them all)
DEBIAN_PACKAGES = {
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu libc6-dev-arm64-cross",
    "qemu-aarch64": "qemu-user",
    "arm-none-eabi-gcc": "gcc-arm-none-eabi libnewlib-arm-none-eabi",
    "qemu-system-arm": "qemu-system-arm",
}


def require(tool: str) -> str:
    """The absolute path of `tool`, or a LoweringError naming the Debian package to install."""
    path = shutil.which(tool)
    if path is None:
        package = DEBIAN_PACKAGES.get(tool, tool)
        raise LoweringError(f"{tool} is not installed (needed for this target); install it with "
                            f"`apt-get install {package}` or run `make setup`")
    return path
