from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import Mounted, mounted, random_image

IMAGE_SIZE = 8 << 20


@pytest.fixture
def disk_mount(tmp_path: Path) -> Iterator[Mounted]:
    """An 8 MiB image of seeded random bytes, served at tmp_path/mnt."""
    image = tmp_path / "disk.img"
    random_image(image, IMAGE_SIZE, seed=1)
    with mounted(image, tmp_path / "mnt") as m:
        yield m
