"""System shared memory for request inputs: the server reads the tensor from /dev/shm instead of the gRPC message."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import numpy as np

from patcher.base.errors import PatcherError


@contextmanager
def shared_input(client: Any, array: np.ndarray, headers: dict[str, str] | None = None) -> Iterator[str]:
    """Put `array` in a new system shared-memory region registered with the server; yield the region's name.

    Registering is a restricted API on servers `patcher serve` starts: `headers` carries their key.
    """
    import tritonclient.utils.shared_memory as shm
    from tritonclient.utils import InferenceServerException

    name = f"patcher_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    key = f"/{name}"
    handle = shm.create_shared_memory_region(name, key, array.nbytes)
    try:
        shm.set_shared_memory_region(handle, [np.ascontiguousarray(array)])
        try:
            client.register_system_shared_memory(name, key, array.nbytes, headers=headers)
        except InferenceServerException as error:
            raise PatcherError(
                f"the server refused system shared memory ({error.message()}): it must run on this machine and "
                "registering needs its key (--key-file, written by `patcher serve`); or drop --shared-memory"
            ) from None
        try:
            yield name
        finally:
            with suppress(InferenceServerException):
                client.unregister_system_shared_memory(name, headers=headers)
    finally:
        shm.destroy_shared_memory_region(handle)
