// The dynamic shared memory of a kernel, as a byte array named `name`. A macro so that the kernel
// emulator of the tests (test/emu/cuda_emu.h) can give it a host buffer instead.
#pragma once

#ifndef SQZ_DYNAMIC_SMEM
#define SQZ_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
