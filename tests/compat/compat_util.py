"""Helpers for the compat tests: the scripts' torch calls spelled for numpy or torch, and greedy decoding
computed without generate()."""
import contextlib
import importlib.util

import numpy as np

HAS_TORCH = importlib.util.find_spec("torch") is not None


class Tensors:
    """The few torch calls the scripts make, spelled for the flavour under test ("np" or "pt")."""

    def __init__(self, name):
        self.name = name
        if name == "pt":
            import torch
            self.torch = torch

    def no_grad(self):
        return self.torch.no_grad() if self.name == "pt" else contextlib.nullcontext()

    def exp(self, x):
        return self.torch.exp(x) if self.name == "pt" else np.exp(x)

    def stack(self, xs):
        return self.torch.stack(xs) if self.name == "pt" else np.stack(xs)

    def clone(self, x):
        return x.clone() if self.name == "pt" else x.copy()

    def is_tensor(self, x):
        return isinstance(x, self.torch.Tensor) if self.name == "pt" else isinstance(x, np.ndarray)

    def float16(self):
        return self.torch.float16 if self.name == "pt" else "float16"

    def item(self, x):
        return float(x.item()) if hasattr(x, "item") else float(x)


def assert_greedy_by_forward(model, prompt_ids, new_ids, tol=0.02):
    """Greedy decoding checked another way: one forward (no KV cache, no generate()) over prompt + answer; after
    each prefix, the answer's next id must be the argmax of model(input_ids).logits, or tie with it within `tol`
    (forward and generate may run different kernels, on a GPU in float16: a near-tie may break either way)."""
    prompt_ids, new_ids = [int(t) for t in prompt_ids], [int(t) for t in new_ids]
    logits = np.asarray(model(np.asarray([prompt_ids + new_ids], dtype=np.int64)).logits, dtype=np.float64)
    T = len(prompt_ids)
    for i, t in enumerate(new_ids):
        row = logits[0, T - 1 + i]
        top = int(np.argmax(row))
        assert t == top or row[t] >= row[top] - tol, (
            f"answer token {i} is {t} (logit {row[t]:.4f}), greedy picks {top} (logit {row[top]:.4f})")
