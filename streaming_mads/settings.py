"""Validation of numeric settings: one check and one message shape for every layer.

Every number ``MADSDataset``, the agents and the console take (``pool_ratio``, an agent's
``init`` weights and ``bins``, ``lr_theta``, ``probe_size``, ...) passes :func:`check_number` or
:func:`check_numbers` when it is constructed. A NaN, an infinity, a string such as ``"64"``, a
bool, a fraction where a count is meant (``1.5``) or a number out of range fails there, naming
the setting, the value and what is allowed, instead of starving or stalling training later.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
from numpy.typing import NDArray

__all__ = ['check_number', 'check_numbers']


def _allowed(integer: bool, low: Optional[float], high: Optional[float], low_open: bool,
             high_open: bool) -> str:
    kind = 'an int' if integer else 'a finite number'
    if low == 0 and low_open and high is None:
        return f'a positive {"int" if integer else "finite number"}'
    if low is not None and high is not None:
        return f'{kind} in {"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
    if low is not None:
        return f'{kind} {">" if low_open else ">="} {low:g}'
    if high is not None:
        return f'{kind} {"<" if high_open else "<="} {high:g}'
    return kind


def check_number(value: Any, name: str, *, integer: bool = False, low: Optional[float] = None,
                 high: Optional[float] = None, low_open: bool = False,
                 high_open: bool = False, hint: str = '') -> Union[int, float]:
    """``value`` as an ``int`` (``integer``) or a finite ``float`` within the bounds, or an error.

    Args:
        value (Any): The setting's value.
        name (str): The setting as the user wrote it, with its section (``'MADSDataset
            pool_ratio'``, ``"agent 'quality' init[0]"``).
        integer (bool): A count: an ``int`` (numpy's too); a float, even ``2.0``, is refused.
        low (float, optional): Lower bound. high (float, optional): Upper bound.
        low_open (bool): Exclude ``low``. high_open (bool): Exclude ``high``.
        hint (str): Appended to the message (what the setting means, or the fix).

    Raises:
        TypeError: Not a number (a string, a bool, a list) or not an int where one is due.
        ValueError: Missing (``None``), NaN, infinite, or out of range.
    """
    allowed = _allowed(integer, low, high, low_open, high_open)
    tail = f' {hint}' if hint else ''
    if value is None:
        raise ValueError(f'{name} is required: it must be {allowed}.{tail}')
    wanted = numbers.Integral if integer else numbers.Real
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, wanted):
        raise TypeError(f'{name}={value!r} ({type(value).__name__}) is not allowed: it must be '
                        f'{allowed}.{tail}')
    number: Union[int, float] = int(value) if integer else float(value)
    below = low is not None and (number < low or (low_open and number == low))
    above = high is not None and (number > high or (high_open and number == high))
    if not math.isfinite(number) or below or above:
        raise ValueError(f'{name}={value!r} is not allowed: it must be {allowed}.{tail}')
    return number


def check_numbers(values: Any, name: str, *, low: Optional[float] = None,
                  low_open: bool = False, hint: str = '') -> NDArray[np.float64]:
    """A non-empty list of finite numbers, each passing :func:`check_number`, as an array.

    Args:
        values (Any): A sequence (list, tuple, a YAML list) or a 1-D array.
        name (str): The setting (an element is named ``name[i]``).
        low (float, optional): Lower bound of every element. low_open (bool): Exclude ``low``.
        hint (str): Appended to the message.
    """
    items = values.tolist() if isinstance(values, np.ndarray) else values
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not len(items):
        raise TypeError(f'{name}={values!r} is not allowed: it must be a non-empty list of '
                        f'numbers.{" " + hint if hint else ""}')
    return np.asarray([check_number(v, f'{name}[{i}]', low=low, low_open=low_open, hint=hint)
                       for i, v in enumerate(items)], np.float64)
