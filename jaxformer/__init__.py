"""jaxformer: Transformers of the literature, trained and run with JAX (README.md)."""

from jaxformer.parallel.target import use_present_platforms

# Before anything starts a JAX backend: a CPU or GPU machine with libtpu installed (the `tpu`
# and `dev` extras) would otherwise print libtpu's failure to find a TPU.
use_present_platforms()
