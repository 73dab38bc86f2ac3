// Portability macros shared by host (C++) and device (CUDA) code. Torch-free.
#pragma once

#if defined(__CUDACC__)
#define ATTNKIT_HD __host__ __device__ __forceinline__
#else
#define ATTNKIT_HD inline
#endif
