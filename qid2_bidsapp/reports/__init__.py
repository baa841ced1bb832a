"""HTML reports built only from the qid2 derivative folder (so ``--reports-only`` can rebuild them).

The builders are imported lazily: importing this package does not pull in matplotlib or DIPY.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["build_group_report", "build_subject_report"]

if TYPE_CHECKING:  # pragma: no cover
    from .group import build_group_report
    from .subject import build_subject_report


def __getattr__(name: str):
    if name == "build_subject_report":
        from .subject import build_subject_report

        return build_subject_report
    if name == "build_group_report":
        from .group import build_group_report

        return build_group_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
