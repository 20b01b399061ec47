/*
 * launch.cuh — how every kernel of the CUDA backend is launched: fmc_launch, with programmatic dependent launch
 * (PDL, sm_90 and CUDA 12.3 on), and the two calls each kernel begins with.
 *
 * Why: a decode step is ~220 small kernels on one stream, each reading what the one before wrote, and between
 * two of them the GPU idles while the next one launches (~1 us a gap on an H100: a fifth of a step). Launched
 * with PDL, kernel N+1 is launched as soon as every block of kernel N has run fmc_pdl_trigger(), so its blocks
 * are resident when N ends. What makes that safe is fmc_pdl_wait(): griddepcontrol.wait blocks "until all
 * prerequisite grids in flight have completed and all the memory operations from the prerequisite grids are
 * performed and made visible to the current grid" (PTX ISA, griddepcontrol), wherever the trigger was; the
 * trigger itself orders no memory. So each kernel begins `fmc_pdl_wait(), fmc_pdl_trigger();` and touches no
 * global memory before the wait (tests/test_layering.py checks the first line); the trigger after it lets the
 * next kernel in while this one computes, one kernel ahead at most. Every kernel waits, so a kernel ends only
 * after the one before it ended: what any earlier kernel wrote is there too. Launched plainly, or built for
 * sm_80, both do nothing.
 *
 * What earlier kernels write is read with ordinary loads: no __restrict__ on those pointers and no __ldg from
 * sm_90 (fmc_ld). The read-only path they lead to (ld.global.nc) is outside the memory model the wait works in,
 * and a const __restrict__ kernel parameter lets the compiler load ahead of the wait (llama.cpp #24030, CCCL's
 * review rule pdl-restrict-aliasing). The weights, which only copies write, keep __ldg.
 *
 * Only a kernel following a kernel on the same stream overlaps: copies, fills and event waits between them stay
 * full dependencies (a programmatic edge joins two kernel nodes only), in stream capture too.
 */
#ifndef FM_CUDA_LAUNCH_CUH
#define FM_CUDA_LAUNCH_CUH

#include <cuda_runtime.h>
#include <stddef.h>

#include <utility>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FMC_PDL_CODE 1 /* this device code may run under PDL */
#else
#define FMC_PDL_CODE 0
#endif

/* before the kernel's first access to global memory: the kernels before it have completed, their writes visible */
__device__ __forceinline__ void fmc_pdl_wait() {
#if FMC_PDL_CODE
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/* the next kernel may be launched (it waits in its own fmc_pdl_wait for this one to complete) */
__device__ __forceinline__ void fmc_pdl_trigger() {
#if FMC_PDL_CODE
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

/* a load of what an earlier kernel wrote (the read-only path below sm_90) */
template <class T> __device__ __forceinline__ T fmc_ld(const T *p) {
#if FMC_PDL_CODE
    return *p;
#else
    return __ldg(p);
#endif
}

#ifdef FLASHMOE_CUDA_EMU /* tests/cuda_emu: rewrite_cu.py turns each fmc_launch into a <<<>>> launch */
inline bool fmc_pdl_on() { return false; }
#else
/* true where kernels launch with PDL (cuda_ops.cu: FLASHMOE_CUDA_PDL, the device, the build). Read once. */
bool fmc_pdl_on();

/* k<<<grid, block, smem, s>>>(args...), with PDL where fmc_pdl_on(). A launch error is cudaGetLastError's, as
 * with <<<>>>. */
template <class... P, class... A>
void fmc_launch(void (*k)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, A &&...args) {
    cudaLaunchAttribute pdl[1];
    pdl[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    pdl[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem, cfg.stream = s;
    cfg.attrs = pdl, cfg.numAttrs = fmc_pdl_on() ? 1 : 0;
    cudaLaunchKernelEx(&cfg, k, std::forward<A>(args)...);
}
#endif

#endif /* FM_CUDA_LAUNCH_CUH */
