"""The request plan: one row's exact request, what it reserves, and why it may not be sent.

Pure. ``run``, ``run --dry-run`` and ``estimate`` build every request here, so the three agree.
"""

from __future__ import annotations

MAX_IMAGES_PER_REQUEST = 10  # reference: "a limit of 10 images per chat request"
