"""Shape-annotated array types for public signatures (jaxtyping). They document shapes and,
under a runtime checker (tests/test_types.py runs jpatch through jaxtyping's import hook with
beartype), dimensions named alike must agree within a call."""

from typing import Optional, Union

import jax
import numpy as np
from jaxtyping import Bool, Float, Int

AnyArray = Union[np.ndarray, jax.Array]
Tokens = Int[AnyArray, "batch pos"]  # token ids
Mask = Optional[Union[Int[AnyArray, "batch pos"], Bool[AnyArray, "batch pos"]]]  # right padding, 1 = real token
Ids = Int[AnyArray, "batch"]  # one token id per prompt (answers, contrasts)
Logits = Float[jax.Array, "batch read vocab"]  # at every position, or at the positions a metric reads
Grid = Float[np.ndarray, "*grid"]  # a sweep's result over its grid axes
