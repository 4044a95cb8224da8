"""Collection: what is measured (`hooks`) apart from how the model runs (`executors`, `sequential`, ranks).

`imatrix.collect(...)` is both this package and the function that runs a collection: importing a
submodule (`imatrix.collect.runner`) rebinds the attribute `imatrix.collect` to the package, so the
package itself is made callable and forwards to `imatrix.collect.runner.collect`.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from imatrix.collect.runner import collect

        return collect(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
