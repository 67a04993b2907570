"""The package as a user meets it: a light import and the public names DESIGN.md promises."""

import subprocess
import sys

import crossent as ce

CORE_API = [
    "entropy",
    "cross_entropy",
    "kl_divergence",
    "softmax_cross_entropy",
    "softmax_cross_entropy_and_grad",
    "log_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_and_grad",
]


def test_core_names_are_exported():
    for name in CORE_API:
        assert callable(getattr(ce, name)), name
        assert name in ce.__all__


def test_import_stays_light():
    # `pip install crossent` needs numpy and array-api-compat only: importing it must not pull in
    # the heavy optional stacks.
    code = (
        "import sys, crossent\n"
        "heavy = [m for m in ('torch', 'triton', 'jax', 'numba', 'scipy', 'sklearn', 'pandas',"
        " 'pyarrow', 'matplotlib', 'dask') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
