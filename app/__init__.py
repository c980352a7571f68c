"""MoME MONAI Deploy application package.

Importing it preloads the CUDA runtime from the ``nvidia-cuda-runtime`` wheel so that Holoscan (and therefore the
MONAI Deploy SDK) imports on machines without a CUDA toolkit.
"""

from app.runtime import preload_cuda_runtime

preload_cuda_runtime()

__version__ = "0.9.1"
