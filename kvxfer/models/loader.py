"""Reading a (possibly sharded) safetensors checkpoint: each rank reads only its slice."""

from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A weight is missing or has the wrong shape."""


class Checkpoint:
    """Name -> tensor index over every `*.safetensors` file of a model directory."""

    def __init__(self, model_dir: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.model_dir = model_dir
        self.dtype = dtype
        self.device = device
        paths = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
        if not paths:
            raise CheckpointError(f"no *.safetensors files in {model_dir!r}")
        self._files = [safe_open(path, framework="pt") for path in paths]
        self._where = {name: f for f in self._files for name in f.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(
        self,
        name: str,
        expected_shape: tuple[int, ...],
        dim: int | None = None,
        start: int = 0,
        length: int | None = None,
    ) -> torch.Tensor:
        """The tensor `name`, checked to have `expected_shape`, narrowed to `[start, start+length)`
        along `dim` when given; only that slice is read from disk."""
        tensor_slice = self._slice(name)
        shape = tuple(tensor_slice.get_shape())
        if shape != tuple(expected_shape):
            raise CheckpointError(
                f"weight {name!r} in {self.model_dir!r} has shape {list(shape)}, "
                f"the model expects {list(expected_shape)}"
            )
        if dim is None:
            tensor = tensor_slice[:]
        else:
            index = [slice(None)] * len(shape)
            index[dim] = slice(start, start + (shape[dim] - start if length is None else length))
            tensor = tensor_slice[tuple(index)]
        return tensor.to(device=self.device, dtype=self.dtype)

    def _slice(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"weight {name!r} is missing from the checkpoint in {self.model_dir!r}")
        return self._where[name].get_slice(name)
