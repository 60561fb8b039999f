"""Make ``PeftType.SPARSE`` exist and register the sparse tuner with upstream peft.

``peft.utils.register_peft_method`` only accepts names that are already members of the ``PeftType`` enum, and peft
offers no public way to add one. The single intervention this package makes in peft is therefore to add the
``SPARSE`` member to that enum, through the same internal tables the ``enum`` module fills when it builds a class
(member map, value map, member-name list, class attribute). Everything after that goes through peft's public
registration API, so ``get_peft_model``, ``PeftConfig.from_pretrained`` and ``PeftModel.from_pretrained`` resolve
the sparse classes exactly as they resolve built-in methods.

The registration itself (:func:`peft_sparse.tuner.register`) lives in the package's ``__init__``, as peft's own tuners
register theirs, so that this module imports nothing of the tuner. Both steps are idempotent: importing this module
twice, reloading it, or importing it after ``peft.mapping`` has been imported leaves one ``SPARSE`` member and one
registration.
"""

from __future__ import annotations

import enum

from peft.utils import PeftType

PEFT_METHOD_NAME = "sparse"
PREFIX = "sparse_"


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add ``name = value`` to a ``str``-valued ``enum_cls`` if it is not a member yet, and return the member."""
    existing = enum_cls.__members__.get(name)
    if existing is not None:
        if existing.value != value:
            raise RuntimeError(
                f"{enum_cls.__name__}.{name} already exists with value {existing.value!r}, not {value!r}"
            )
        return existing
    if value in enum_cls._value2member_map_:
        raise RuntimeError(f"{enum_cls.__name__} already has a member with value {value!r}")
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    # Order matters: set the class attribute before the member maps, because EnumType.__setattr__ refuses to
    # (re)assign names that are already in the member map.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


SPARSE_PEFT_TYPE = _add_enum_member(PeftType, "SPARSE", "SPARSE")
