"""The pinned files `make` installs from: the Ray extra's lock never moves a version the main lock pins."""

from __future__ import annotations

from pathlib import Path

from conftest import ROOT


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            found[name.strip().lower().replace("_", "-")] = version.strip()
    return found


def test_the_ray_lock_pins_only_what_the_main_lock_does_not():
    """`make` installs requirements-ray.lock with requirements.lock as constraints: a package in both would
    either be the same pin or make the install fail."""
    main, extra = pins(ROOT / "requirements.lock"), pins(ROOT / "requirements-ray.lock")

    both = set(main) & set(extra)

    assert "ray" in extra
    assert {name: (main[name], extra[name]) for name in both} == {}
