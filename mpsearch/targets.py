"""A search's target: a built-in profile's name, a profile file's path, or a HardwareProfile, as the
HardwareProfile it names, with mpsearch's typed errors (UnknownTargetError for a name no profile
has, InvalidConfigError for a profile file or object whose figures are unusable)."""

from __future__ import annotations

from hw_models import HardwareProfile, UnknownProfileError, get_profile
from hw_models.profile_file import ProfileFileError
from mpsearch.errors import InvalidConfigError, UnknownTargetError


def resolve_target(target: str | HardwareProfile) -> HardwareProfile:
    if isinstance(target, HardwareProfile):
        problems = target.bound_problems()  # as a profile file's figures are (hw_models.profile.FIGURE_BOUNDS)
        if problems:
            raise InvalidConfigError(f"profile {target.name}: {problems[0]}")
        return target
    try:
        return get_profile(target)
    except UnknownProfileError as e:
        raise UnknownTargetError(str(e)) from None
    except ProfileFileError as e:
        raise InvalidConfigError(str(e)) from None
