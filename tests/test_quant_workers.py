"""`imatrix.quant.workers`: forked workers whose results come back in order, and whose death is an error."""

from __future__ import annotations

import os
import time

import pytest

from imatrix import ImatrixError
from imatrix.quant.workers import Workers


def slow_square(n: int) -> int:
    time.sleep(0.02 * (n % 3))  # later tasks often finish first
    return n * n


def test_results_come_back_in_the_tasks_order() -> None:
    with Workers(slow_square, 3) as workers:
        assert list(workers.map(range(20))) == [n * n for n in range(20)]
        assert list(workers.map([])) == []


def refuse_seven(n: int) -> int:
    if n == 7:
        raise ImatrixError("seven")
    return n


def test_an_error_in_a_task_is_raised_in_the_parent() -> None:
    with pytest.raises(ImatrixError, match="^seven$"), Workers(refuse_seven, 2) as workers:
        list(workers.map(range(10)))


def exit_on_five(n: int) -> int:
    if n == 5:
        os._exit(3)
    return n


def test_a_worker_that_dies_is_an_error_not_a_hang() -> None:
    with pytest.raises(ImatrixError, match=r"a worker process ended unexpectedly \(exit code 3\)"), \
            Workers(exit_on_five, 2) as workers:
        list(workers.map(range(10)))
