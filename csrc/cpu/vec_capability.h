#pragma once
// NOTE: [CPU vector width]
// ATen's at::vec picks its AVX2 / AVX-512 implementation from the CPU_CAPABILITY_* macros, which
// torch's own build sets per compiled copy of a kernel. An extension gets the generic (128-bit)
// implementation unless it sets them itself. setup.py compiles the CPU kernels with -march=native by
// default (SEGCLIP_CPU_ARCH=native; =portable for a build that runs on any x86-64), and here we turn
// the compiler's own target macros into the matching capability. The inline namespace gets a name of
// our own so these inline functions never collide with torch's AVX2/AVX512 copies.
#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512 1
#define SEGCLIP_VEC_NAME "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2 1
#define SEGCLIP_VEC_NAME "avx2"
#else
#define SEGCLIP_VEC_NAME "default"
#endif
#define CPU_CAPABILITY segclip_cpu
#endif
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
